"""``extract-lora``: a LoRA adapter (mlx-lm or PEFT) from a fine-tune and its base."""

from __future__ import annotations

import json

import click

from mlxmerge.cli import cli
from mlxmerge.cli.models import DTYPE, human_count
from mlxmerge.cli.progress import progress_bar


@cli.command("extract-lora")
@click.argument("finetuned")
@click.option("--base", required=True, help="The model FINETUNED was fine-tuned from.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Adapter folder to write.")
@click.option("--rank", type=int, default=None, help="LoRA rank of every module.")
@click.option("--energy", type=float, default=None,
              help="Instead of --rank: per module, the smallest rank keeping this share of ‖ΔW‖² (0.9).")  # fmt: skip
@click.option("--max-rank", type=int, default=None, help="With --energy: never above this rank.")
@click.option("--format", "adapter_format", type=click.Choice(["mlx", "peft"]), default="mlx",
              show_default=True,
              help="mlx: mlx_lm.load(BASE, adapter_path=...); peft: PeftModel.from_pretrained.")  # fmt: skip
@click.option("--modules", multiple=True,
              help="Only these modules (q_proj, self_attn.o_proj; repeat or comma-separate).")  # fmt: skip
@click.option("--dtype", type=DTYPE, default="float32", show_default=True, help="Adapter dtype.")
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto",
              show_default=True,
              help="auto: randomized (Halko et al.) when the rank is small against the layer, else exact.")  # fmt: skip
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="PNG of the share of ‖ΔW‖² kept against rank (needs matplotlib).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
def extract_lora(finetuned, base, output, rank, energy, max_rank, adapter_format, modules, dtype,
                 svd, plot, as_json, force):  # fmt: skip
    """Extract a LoRA adapter from FINETUNED − BASE (truncated SVD per linear layer)."""
    from mlxmerge.io import open_checkpoint
    from mlxmerge.lora.extract import extract_lora as run

    mods = [m.strip() for ms in modules for m in ms.split(",") if m.strip()]
    total = len(open_checkpoint(base).names())
    with progress_bar(total, "extract", "tensor") as bar:
        report = run(finetuned, base, output, rank=rank, energy=energy, max_rank=max_rank,
                     format=adapter_format, modules=mods or None, dtype=dtype, svd=svd, force=force,
                     progress=lambda _n: bar.update())  # fmt: skip
    if plot:
        from mlxmerge.lora.plot import plot_captured

        plot_captured(report, plot)
    if as_json:
        report.pop("captured")
        click.echo(json.dumps(report, indent=2))
        return
    print_report(report)
    if plot:
        click.echo(f"wrote {plot}")


def print_report(report: dict) -> None:
    from mlxmerge.lora.write import layer_relative

    kinds: dict[str, list[dict]] = {}
    for row in report["modules"]:
        kinds.setdefault(layer_relative(row["module"]), []).append(row)
    click.echo(f"{'module':<20} {'count':>5} {'rank':>9} {'kept ‖ΔW‖²':>11} {'‖ΔW‖/‖W‖':>9}")
    for kind, rows in kinds.items():
        ranks = [r["rank"] for r in rows]
        span = str(ranks[0]) if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}"
        kept = min(r["energy"] for r in rows)
        rel = sum(r["rel_delta"] for r in rows) / len(rows)
        click.echo(f"{kind:<20} {len(rows):>5} {span:>9} {f'≥{kept:.1%}':>11} {rel:>9.4f}")
    for row in report["not_covered"]:
        how = "written as modules_to_save" if row["written"] else "not in the adapter"
        click.echo(f"warning: {row['tensor']} changed ({row['rel_delta']:.3g} relative); {how}")
    click.echo(
        f"wrote {report['output']} ({report['format']}, "
        f"{human_count(report['parameters'])} LoRA parameters)"
    )
