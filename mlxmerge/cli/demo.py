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
    """Build small models locally; merge, abliterate and train an SAE on them (no network)."""
    from mlxmerge.demo import run_demo

    say = (lambda msg: None) if as_json else (lambda msg: click.echo(f"... {msg}", err=True))
    report = run_demo(output, seed=seed, progress=say)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"demo folder: {report['folder']}")
    for section in ("abliteration", "merge", "sae"):
        click.echo(f"{section}:")
        for k, v in report[section].items():
            click.echo(f"  {k}: {v}")
