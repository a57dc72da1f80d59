"""``mlxmerge demo``: the whole toolkit on small models built locally, no network."""

from __future__ import annotations

import json

import click

from mlxmerge.cli import cli


@cli.command()
@click.option("-o", "--output", default="mlxmerge-demo", show_default=True, type=click.Path(),
              help="Folder for the demo's models (replaced if it exists).")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def demo(output, seed, as_json):
    """Build small Llama-style models locally, merge them and run the result with mlx-lm."""
    from mlxmerge.demo import run_demo

    report = run_demo(output, seed=seed)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"demo folder: {report['folder']}")
    click.echo("built a tokenizer and three small Llama-style models (base, model_a, model_b):")
    for name, path in report["models"].items():
        click.echo(f"  {name}: {path}")
    m = report["merge"]
    click.echo(f"merged model_a and model_b with {m['method']} -> {m['output']}")
    click.echo(f"  mlx_lm.generate on the merge: {m['generation']!r}")
    for section in ("abliteration", "sae"):
        if section in report:
            click.echo(f"{section}:")
            for k, v in report[section].items():
                click.echo(f"  {k}: {v}")
