"""``evolve``: search a merge recipe with CMA-ES (mergekit-evolve's job, on MLX)."""

from __future__ import annotations

import json

import click

from mlxmerge.cli import cli
from mlxmerge.cli.models import DTYPE
from mlxmerge.cli.progress import duration, is_quiet


def _fmt(x) -> str:
    return "failed" if x is None else f"{x:.4f}"


@cli.command()
@click.argument("config", type=click.Path())
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Write the best merge here (with mlxmerge_config.yml and evolve.json).",
)
@click.option(
    "--budget",
    type=int,
    default=None,
    help="Candidates to merge and score, the starting one included [default: 100].",
)
@click.option(
    "--time",
    "time_limit",
    default=None,
    help="Start no candidate after this long: 90s, 30m, 2h (with --budget: both bound).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of CMA-ES.")
@click.option(
    "--sigma0",
    type=float,
    default=1 / 6,
    show_default="1/6",
    help="CMA-ES initial step size (mergekit-evolve's default).",
)
@click.option(
    "--population",
    "popsize",
    type=int,
    default=None,
    help="Candidates per CMA-ES generation [default: 4 + 3 ln(genes)].",
)
@click.option(
    "--out-dtype",
    type=DTYPE,
    default="bfloat16",
    show_default=True,
    help="dtype candidates are built and scored in, and the output's.",
)
@click.option(
    "--in-memory/--streamed",
    "in_memory",
    default=None,
    help="Build candidates in memory or through a temporary folder [default: in memory "
    "when the model takes under a third of RAM].",
)
@click.option(
    "--state", type=click.Path(), default=None, help="State file [default: OUTPUT.evolve.json]."
)
@click.option("--resume", is_flag=True, help="Continue the search in the state file.")
@click.option(
    "--plot",
    type=click.Path(),
    default=None,
    help="Write a PNG of score against candidates evaluated (needs matplotlib).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check everything, time one candidate, print the genome and the estimate.",
)
@click.option("--force", is_flag=True, help="Replace a non-empty output and an old state file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evolve(config, output, as_json, **kw):  # fmt: skip
    """Search a merge's parameters (CONFIG: a mergekit-evolve YAML) against task files."""
    import yaml

    from mlxmerge.evolve import evolve as run

    quiet = is_quiet() or as_json

    def on_candidate(e: dict) -> None:
        # One plain line per candidate on stderr: readable in a log file as on a terminal.
        if quiet:
            return
        if e["event"] == "resume":
            click.echo(f"resumed {e['candidates']} candidates from {e['state']}, best "
                       f"{_fmt(e['best'])}", err=True)  # fmt: skip
            return
        of = f"/{e['budget']}" if e["budget"] else ""
        eta = f" · eta {duration(e['eta'])}" if e["eta"] is not None else ""
        click.echo(
            f"candidate {e['index']}{of} (gen {e['generation']}): {_fmt(e['score'])} · best "
            f"{_fmt(e['best'])} (#{e['best_index']}) · {duration(e['elapsed'])}{eta}",
            err=True,
        )

    try:
        report = run(config, output, on_candidate=on_candidate, **kw)
    except KeyboardInterrupt:
        from mlxmerge.evolve.state import default_path

        state = kw["state"] or default_path(output)
        click.echo(
            f"\ninterrupted; the scores so far are in {state}: continue with --resume", err=True
        )
        raise SystemExit(130) from None
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    if report.get("dry_run"):
        r = report
        click.echo(f"genome: {r['genome_size']} values {tuple(r['genome_shape'])} "
                   f"(layer groups, models, filter sets, parameters: {', '.join(r['parameters'])})")  # fmt: skip
        click.echo(f"population: {r['population']} candidates per generation")
        click.echo(f"per candidate: a {r['candidate_bytes'] / 1e6:.1f} MB merge {r['built']}, "
                   f"{r['sequences_per_candidate']} sequences scored; timed on the starting "
                   f"recipe: {r['build_seconds']:.1f} s build + {r['score_seconds']:.1f} s score "
                   f"(score {_fmt(r['start_score'])})")  # fmt: skip
        click.echo(f"estimated: {r['candidates']} candidates, {duration(r['estimated_seconds'])}")
        click.echo(
            "\nstarting recipe:\n" + yaml.safe_dump(r["start_recipe"], sort_keys=False).rstrip()
        )
        return
    b, s = report["best"], report["start"]
    click.echo(f"\n{report['candidates']} candidates ({report['stopped']}), "
               f"{duration(report['search_seconds'])} of building and scoring, {report['built']}")  # fmt: skip
    click.echo(f"{'':24}{'search':>10}{'held-out':>10}")
    click.echo(f"{'start (mergekit x0)':24}{_fmt(s['search']):>10}{_fmt(s['held_out']):>10}")
    click.echo(
        f"{'best (#' + str(b['index']) + ')':24}{_fmt(b['search']):>10}{_fmt(b['held_out']):>10}"
    )
    for task, v in b["held_out_tasks"].items():
        click.echo(f"  held-out {task}: {_fmt(v)}")
    click.echo(f"\nwrote {report['output']} (recipe: mlxmerge_config.yml; history: evolve.json)")
