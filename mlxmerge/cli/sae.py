"""``mlxmerge sae ...``: collect activations, train, evaluate, inspect and steer sparse autoencoders."""

from __future__ import annotations

import functools
import json
import logging

import click

from mlxmerge.cli import cli
from mlxmerge.cli.compute import compute_dtype_option
from mlxmerge.cli.evaluate import quiet_length_warning
from mlxmerge.cli.progress import is_quiet, progress_bar
from mlxmerge.io.writer import parse_size
from mlxmerge.sae.kinds import TRAINABLE

DATA_HELP = (
    ".txt (documents separated by blank lines; one per line when it has none) "
    "or .jsonl with 'text'."
)


def output_option(help_text: str):
    """``-o, --output`` like every other command; ``--out``, the old spelling, still works."""

    def deco(fn):
        @functools.wraps(fn)
        def command(*args, out=None, out_alias=None, **kw):
            if not (out or out_alias):
                raise click.UsageError("give the output folder with -o/--output")
            return fn(*args, out=out or out_alias, **kw)

        command = click.option("--out", "out_alias", hidden=True)(command)
        return click.option("-o", "--output", "out", help=help_text)(command)

    return deco


def _size(_ctx, _param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a count like 20000, 2M or 500K") from None


def _widths(_ctx, _param, value):
    if value is None:
        return None
    try:
        return tuple(int(w) for w in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma list of sizes like 128,512") from None


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    for key, value in result.items():
        click.echo(f"{key:28s} {value:.6g}" if isinstance(value, float) else f"{key:28s} {value}")


@cli.group()
def sae():
    """Sparse autoencoders: collect, train, eval, features, steer."""


@sae.command()
@click.argument("model")
@click.option(
    "--layer", "layer", type=int, multiple=True, required=True, help="Block index (repeatable)."
)
@click.option("--data", required=True, help=f"Text: {DATA_HELP}")
@click.option(
    "--tokens", default="2M", callback=_size, show_default=True, help="Tokens to collect."
)
@output_option("Output folder.")
@click.option("--context-size", default=128, show_default=True, help="Tokens per row (BOS first).")
@click.option(
    "--dtype", default="float32", type=click.Choice(["float32", "float16"]), show_default=True
)
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@compute_dtype_option
def collect(model, layer, data, tokens, out, context_size, dtype, force):
    """Cache residual-stream activations of MODEL at one or more layers."""
    from mlxmerge.sae import collect as run

    quiet_length_warning()
    with progress_bar(tokens, "collect", "tok") as bar:
        meta = run(model, list(layer), data, out, tokens=tokens, context_size=context_size,
                   dtype=dtype, force=force, progress=bar.update)  # fmt: skip
    click.echo(
        f"{meta['tokens']} tokens x {len(meta['layers'])} layer(s), d_in {meta['d_in']} -> {out}"
    )
    if meta["tokens"] < tokens:
        click.echo(
            f"warning: {data} ran out after {meta['tokens']} tokens of the {tokens} asked for "
            "(--tokens); add text or ask for fewer",
            err=True,
        )


@sae.command()
@click.argument("model", required=False)
@click.option("--acts", help="Activation folder from `sae collect`.")
@click.option("--layer", type=int, help="Block index (on the fly, or to pick one layer of --acts).")
@click.option("--data", help=f"Text for on-the-fly training: {DATA_HELP}")
@output_option("Output SAE folder (SAELens format).")
@click.option("--k", default=32, show_default=True, help="Active latents per token.")
@click.option("--expansion", default=8, show_default=True, help="d_sae = expansion x d_in.")
@click.option("--arch", "architecture", default="topk", show_default=True,
              type=click.Choice(TRAINABLE), help="SAE kind (SAELens's names).")  # fmt: skip
@click.option("--tokens", default="2M", callback=_size, show_default=True, help="Training tokens.")
@click.option("--batch-size", default=4096, show_default=True, help="Tokens per step.")
@click.option("--lr", type=float, help="Adam learning rate [2e-4*sqrt(2^14/d_sae); relu 5e-5].")
@click.option("--seed", default=0, show_default=True)
@click.option("--auxk-alpha", default=1 / 32, show_default=True, help="AuxK weight (0: off).")
@click.option(
    "--dead-tokens", type=int, help="Dead window in tokens [min(10M, max(N/20, 16 batches))]."
)
@click.option("--l1-coefficient", default=5.0, show_default=True, help="relu only: L1 weight.")
@click.option("--l0-coefficient", default=1.0, show_default=True, help="jumprelu only: L0 weight.")
@click.option("--jumprelu-bandwidth", default=0.05, show_default=True,
              help="jumprelu only: threshold pseudo-gradient bandwidth.")  # fmt: skip
@click.option("--jumprelu-init-threshold", default=0.01, show_default=True,
              help="jumprelu only: threshold at init.")  # fmt: skip
@click.option("--matryoshka-widths", callback=_widths,
              help="matryoshka_batchtopk: nested prefix sizes, e.g. 128,512,2048 [d_sae/16..d_sae].")  # fmt: skip
@click.option("--log-every", default=50, show_default=True, help="Steps between log lines.")
@click.option("--buffer", "buffer_tokens", callback=_size,
              help="On the fly: tokens in the shuffled activation buffer [16 x --batch-size].")  # fmt: skip
@click.option("--held-out", default=0.05, show_default=True,
              help="Fraction of the activations (on the fly: of the documents) kept out of "
              "training (<=16384 tokens; 0: none).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@compute_dtype_option
def train(model, acts, layer, data, out, k, expansion, architecture, tokens, batch_size, lr, seed,
          auxk_alpha, dead_tokens, l1_coefficient, l0_coefficient, jumprelu_bandwidth,
          jumprelu_init_threshold, matryoshka_widths, log_every, buffer_tokens, held_out,
          force):  # fmt: skip
    """Train an SAE from cached activations (--acts) or on the fly (MODEL --layer --data)."""
    if not is_quiet():  # the periodic loss / FVU / L0 / dead / tok/s lines
        logging.getLogger("mlxmerge.sae.train").setLevel(logging.INFO)
    from mlxmerge.sae import train as run

    quiet_length_warning()

    with progress_bar(tokens, "train", "tok") as bar:
        result = run(out, acts=acts, model=model, layer=layer, data=data, k=k, expansion=expansion,
                     architecture=architecture, tokens=tokens, batch_size=batch_size, lr=lr, seed=seed,
                     log_every=log_every, held_out=held_out, force=force,
                     progress=lambda _i, n: bar.update(n), buffer_tokens=buffer_tokens,
                     auxk_alpha=auxk_alpha, dead_tokens=dead_tokens,
                     l1_coefficient=l1_coefficient, l0_coefficient=l0_coefficient,
                     jumprelu_bandwidth=jumprelu_bandwidth, matryoshka_widths=matryoshka_widths,
                     jumprelu_init_threshold=jumprelu_init_threshold)  # fmt: skip
    _print(result, False)


@sae.command("eval")
@click.argument("sae_path", metavar="SAE")
@click.argument("model")
@click.option("--data", required=True, help=f"Evaluation text: {DATA_HELP}")
@click.option("--tokens", default="20K", callback=_size, show_default=True)
@click.option("--context-size", type=int, default=None,
              help="Tokens per row [the SAE's own, from its cfg.json; else 128].")  # fmt: skip
@click.option("--layer", type=int, help="Override the layer in the SAE's cfg.json.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@compute_dtype_option
def evaluate(sae_path, model, data, tokens, context_size, layer, as_json):
    """FVU, explained variance, L0, dead latents and loss recovered with the SAE spliced in."""
    from mlxmerge.sae import evaluate_sae

    quiet_length_warning()
    with progress_bar(tokens, "sae eval", "tok") as bar:
        result = evaluate_sae(sae_path, model, data, tokens=tokens, context_size=context_size,
                              layer=layer, progress=bar.update)  # fmt: skip
    warnings = [] if as_json else result.pop("warnings")  # JSON keeps them as a field
    _print(result, as_json)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


@sae.command()
@click.argument("sae_path", metavar="SAE")
@click.argument("model")
@click.option("--data", required=True, help="Text to find top-activating contexts in.")
@output_option("Report folder (index.html + features.json).")
@click.option(
    "--feature", "features", type=int, multiple=True, help="Latent to report (repeatable)."
)
@click.option(
    "--n-features", default=50, show_default=True, help="Else: the N most active latents."
)
@click.option("--tokens", default="20K", callback=_size, show_default=True)
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@compute_dtype_option
def features(sae_path, model, data, out, features, n_features, tokens, force):
    """Write a browsable HTML + JSON report of latents: contexts, density, logit lens."""
    from mlxmerge.sae import feature_report

    quiet_length_warning()

    with progress_bar(tokens, "features", "tok") as bar:
        report = feature_report(sae_path, model, data, out, features=list(features) or None,
                                n_features=n_features, tokens=tokens, force=force,
                                progress=bar.update)  # fmt: skip
    click.echo(f"{len(report['features'])} features -> {out}/index.html")


@sae.command()
@click.argument("sae_path", metavar="SAE")
@click.argument("model")
@click.option("--feature", type=int, required=True, help="Latent index.")
@click.option("--scale", type=float, help="Add scale x the unit decoder direction.")
@click.option("--relative", is_flag=True,
              help="--scale in units of the median residual norm at the layer on the prompt.")  # fmt: skip
@click.option("--clamp", type=float, help="Pin the feature's activation to this value.")
@click.option("--ablate", is_flag=True, help="Pin the feature to zero.")
@click.option("--prompt", required=True)
@click.option("--max-tokens", default=40, show_default=True)
@click.option("--layer", type=int, help="Override the layer in the SAE's cfg.json.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@compute_dtype_option
def steer(
    sae_path, model, feature, scale, clamp, ablate, prompt, max_tokens, layer, chat, relative
):
    """Generate with a feature added, clamped or ablated, next to the plain output."""
    from mlxmerge.sae import steer as run

    result = run(sae_path, model, prompt, feature=feature, scale=scale, clamp=clamp, ablate=ablate,
                 max_tokens=max_tokens, layer=layer, chat=chat, relative=relative)  # fmt: skip
    click.echo(
        f"--- plain\n{result['plain']}\n--- steered (feature {feature}, layer {result['layer']})"
    )
    click.echo(result["steered"])
    for w in result["warnings"]:
        click.echo(f"warning: {w}", err=True)


@sae.command()
@click.argument("sae_path", metavar="SAE")
@click.argument("model")
@click.option("--feature", "features", type=int, multiple=True, required=True,
              help="Latent whose decoder direction to edit (repeatable: their span).")  # fmt: skip
@click.option("--scale", default=0.0, show_default=True,
              help="Multiply what the writers write along the feature(s): 0 removes, 2 doubles.")  # fmt: skip
@output_option("Output model folder.")
@click.option("--dtype", default="bfloat16", show_default=True,
              type=click.Choice(["bfloat16", "float16", "float32"]))  # fmt: skip
@click.option(
    "--format", "layout", default="mlx", show_default=True, type=click.Choice(["mlx", "hf"])
)
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
def ablate(sae_path, model, features, scale, out, dtype, layout, force):
    """Edit SAE features into MODEL's weights: every residual writer stops writing them."""
    from mlxmerge.sae.ablate import ablate_features

    report = ablate_features(sae_path, model, out, features=list(features), scale=scale,
                             dtype=dtype, layout=layout, force=force)  # fmt: skip
    click.echo(
        f"features {report['features']} x{scale:g} in {report['edited_tensors']} tensors -> {out}"
    )
