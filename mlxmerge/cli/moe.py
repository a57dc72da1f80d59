"""``moe``: a mixture of experts from dense fine-tunes (mergekit-moe's config)."""

from __future__ import annotations

import click

from mlxmerge.cli import cli
from mlxmerge.cli.compute import compute_dtype_option
from mlxmerge.cli.models import FORMAT_HELP, LAYOUT, gguf_type_option, human_bytes
from mlxmerge.cli.progress import progress_bar


@cli.command("moe")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", required=False, type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="Output folder.")
@click.option(
    "--dry-run", is_flag=True, help="Check the config and print the plan; compute nothing."
)
@click.option(
    "--format",
    "layout",
    type=LAYOUT,
    default="mlx",
    show_default=True,
    help=FORMAT_HELP,
)
@gguf_type_option
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for random gates and noise_scale."
)
@click.option(
    "--batch-size",
    type=int,
    default=32,
    show_default=True,
    help="Prompts per forward pass (gate_mode: hidden).",
)
@click.option("--shard-size", default="5GB", show_default=True)
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option(
    "--i-understand-this-is-not-useful-without-training",
    "allow_all_same",
    is_flag=True,
    help="Allow every expert to be the same model (mergekit's flag).",
)
@compute_dtype_option
def moe_cmd(config, out, output, dry_run, layout, gguf_type, seed, batch_size, shard_size, force,
            allow_all_same):  # fmt: skip
    """Build a mixture of experts from a mergekit-moe CONFIG into OUT (or -o OUT)."""
    from mlxmerge.io.model_folder import output_size
    from mlxmerge.merge.moe import moe, plan_moe

    plan = plan_moe(config, allow_all_same=allow_all_same)
    if dry_run:
        cfg = plan.config
        click.echo(
            f"architecture: {plan.arch.name} ({plan.arch.model_type}), base {cfg.base_model}"
        )
        click.echo(f"experts: {', '.join(e.source_model for e in cfg.experts)}; "
                   f"{cfg.experts_per_token} per token; gate_mode {cfg.gate_mode}")  # fmt: skip
        for e in cfg.shared_experts:
            click.echo(f"shared expert: {e.source_model}")
        size = output_size(plan.tensors, plan.dtype, None)
        click.echo(f"output: {len(plan.tensors)} tensors, {human_bytes(size)}")
        return
    target = output or out
    if not target:
        raise click.UsageError("give the output folder with -o/--output")
    with progress_bar(len(plan.tensors), "moe", "tensor") as bar:
        path = moe(plan, target, layout=layout, seed=seed, batch_size=batch_size,
                   shard_size=shard_size, force=force, progress=lambda _n: bar.update(),
                   gguf_type=gguf_type)  # fmt: skip
    click.echo(f"wrote {path}")
