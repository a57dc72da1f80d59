"""``eval`` (perplexity, multiple choice, generation, test-time compute) and ``soup``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from mlxmerge.cli import cli
from mlxmerge.cli.compute import compute_dtype_option
from mlxmerge.cli.merge import quantize_kwargs, quantize_options
from mlxmerge.cli.models import DTYPE, LAYOUT, gguf_type_option
from mlxmerge.cli.progress import labelled_steps, progress_bar
from mlxmerge.errors import MlxmergeError


class _DropLengthWarning(logging.Filter):
    """transformers warns that a long document exceeds the model's length; it is split first."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "sequence length is longer than the specified maximum" not in record.getMessage()


def quiet_length_warning() -> None:
    """Drop transformers' misleading "sequence length is longer than the maximum" warning:
    perplexity splits documents into --max-length windows and ``sae`` packs context-size rows."""
    logger = logging.getLogger("transformers.tokenization_utils_base")
    if not any(isinstance(f, _DropLengthWarning) for f in logger.filters):
        logger.addFilter(_DropLengthWarning())


def scoring_options(fn):
    """Options that ``eval`` and ``soup`` share."""
    opts = [
        click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per forward pass."),
        click.option("--max-length", type=int, default=512, show_default=True,
                     help="Perplexity: tokens per window (longer documents are split)."),
        click.option("--max-tokens", type=int, default=32, show_default=True, help="Generation: most tokens per answer."),
        click.option("--extract", default=None, metavar="REGEX",
                     help="Generation: the answer is REGEX's first match (its group 1 if any) [first non-empty line]."),
        click.option("--chat", is_flag=True, help="Generation: wrap prompts in the tokenizer's chat template."),
        click.option("--normalize", is_flag=True,
                     help="Multiple choice: rank by accuracy_norm (log-likelihood per byte of the choice)."),
    ]  # fmt: skip
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return "-" if v is None else str(v)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    text = [bool(rows) and isinstance(rows[0][i], str) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if t else c.rjust(w) for c, w, t in zip(r, widths, text))

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells]


SHOWN = {
    "perplexity": ["perplexity", "nll_per_token", "bits_per_byte", "tokens"],
    "choice": ["accuracy", "accuracy_norm", "items"],
    "generation": ["exact_match", "items", "tokens"],
}


def print_results(report: dict) -> None:
    for task in report["tasks"]:
        rows = {r["model"]: r for r in report["results"] if r["task"] == task["name"]}
        cols = SHOWN[task["kind"]]
        click.echo(f"\n{task['name']} ({task['kind']}, {task['size']} {'documents' if task['kind'] == 'perplexity' else 'items'}; "
                   f"ranked by {task['metric']}, {'lower' if task['kind'] == 'perplexity' else 'higher'} is better)")  # fmt: skip
        body = [
            [i + 1, m] + [rows[m]["metrics"][c] for c in cols]
            for i, m in enumerate(report["ranking"][task["name"]])
        ]
        for line in _table(["rank", "model"] + cols, body):
            click.echo(line)
        for m in report["ranking"][task["name"]]:
            curve = rows[m]["metrics"].get("curve")
            if not curve:
                continue
            click.echo(
                f"\n{m}: accuracy against samples per prompt (vote: {rows[m]['metrics']['vote']})"
            )
            heads = [
                "samples",
                "majority",
                "best_of",
                "any_correct",
                "tokens",
                "tokens_per_correct",
            ]
            for line in _table(heads, [[c[h] for h in heads] for c in curve]):
                click.echo(line)


def write_plot(report: dict, path: str | Path) -> Path:
    """PNG of accuracy against tokens generated (one line per model and vote)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MlxmergeError("--plot needs matplotlib: pip install 'mlxmerge[plot]'") from None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in report["results"]:
        curve = r["metrics"].get("curve")
        if not curve:
            continue
        tokens = [c["tokens"] for c in curve]
        for key, style in (("majority", "o-"), ("best_of", "s--"), ("any_correct", ":")):
            ax.plot(
                tokens,
                [c[key] for c in curve],
                style,
                label=f"{Path(r['model']).name} · {r['task']} · {key}",
            )
        for c in curve:
            ax.annotate(str(c["samples"]), (c["tokens"], c["majority"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens generated (log scale; labels: samples per prompt)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


@cli.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--task", "tasks", multiple=True, required=True, type=click.Path(),
              help="Task file: text (perplexity) or .jsonl (multiple choice / generation). Repeatable.")  # fmt: skip
@scoring_options
@click.option(
    "--samples",
    type=int,
    default=1,
    show_default=True,
    help="Generation: answers sampled per prompt.",
)
@click.option("--vote", type=click.Choice(["majority", "best-of"]), default="majority", show_default=True,
              help="How N samples become one answer: most frequent, or highest mean log-probability.")  # fmt: skip
@click.option(
    "--temperature",
    type=float,
    default=None,
    help="Sampling temperature [0 with --samples 1, else 0.7].",
)
@click.option(
    "--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling threshold."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="With --samples: write accuracy against tokens generated to this PNG.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the full results as JSON.")
@compute_dtype_option
def eval_cmd(models, tasks, plot, as_json, **kw):
    """Score MODELS on task files and rank them (perplexity, multiple choice, exact match)."""
    from mlxmerge.eval.scoring import evaluate

    if plot and kw["samples"] < 2:
        raise click.UsageError("--plot draws the --samples curve; give --samples 2 or more")
    quiet_length_warning()
    with progress_bar(None, "eval", "seq") as bar:
        progress = labelled_steps(bar)

        report = evaluate(list(models), list(tasks), progress=progress, **kw)
    for r in report["results"]:  # per-item lists are for --json only
        for k in ("predictions", "predictions_norm", "answers"):
            if not as_json:
                r["metrics"].pop(k, None)
    if plot:
        report["plot"] = str(write_plot(report, plot))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    print_results(report)
    if plot:
        click.echo(f"\nwrote {report['plot']}")


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    default=None,
    help="Write the soup here (omit to only score).",
)
@click.option(
    "--eval",
    "eval_task",
    required=True,
    type=click.Path(),
    help="Held-out task file that selects the soup.",
)
@click.option(
    "--greedy",
    is_flag=True,
    help="Greedy soup (Wortsman et al.): add models while the score improves [default].",
)
@click.option("--uniform", is_flag=True, help="The uniform average of all models.")  # fmt: skip
@click.option(
    "--ensemble", is_flag=True, help="Also score the output-averaged ensemble (N× inference cost)."
)
@scoring_options
@click.option("--out-dtype", type=DTYPE, default="bfloat16", show_default=True)
@click.option("--format", "layout", type=LAYOUT, default="mlx", show_default=True)
@gguf_type_option
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@quantize_options
@compute_dtype_option
def soup(models, greedy, uniform, as_json, quantize_bits, group_size, **kw):
    """Average fine-tunes of one base into a soup, chosen on a held-out task (--eval)."""
    import yaml

    from mlxmerge.merge.soup import soup as run

    if greedy and uniform:
        raise click.UsageError("give --greedy or --uniform, not both")
    quiet_length_warning()

    printed: list[bool] = []  # the heading goes out with the first score, after all checks

    def on_step(step: dict):
        if as_json:
            return
        if step["stage"] == "individual":
            if not printed:
                click.echo("individual models:")
                printed.append(True)
            click.echo(f"  score {_fmt(step['score'])}  {step['model']}")
        elif step["stage"] == "soup" and step["candidate"] == "all":
            click.echo(f"uniform soup of {len(step['soup'])}: {_fmt(step['score'])}")
        elif step["stage"] == "soup" and step["soup"] == [step["candidate"]]:
            click.echo(
                f"greedy soup:\n  start from the best, {step['candidate']}: {_fmt(step['score'])}"
            )
        elif step["stage"] == "soup":
            size = len(step["soup"]) + (0 if step["kept"] else 1)
            verdict = "kept" if step["kept"] else "left out"
            click.echo(
                f"  + {step['candidate']}: soup of {size} scores {_fmt(step['score'])} → {verdict}"
            )
        elif step["stage"] == "ensemble":
            click.echo(f"  ensemble of {len(models)} (output-averaged): {_fmt(step['score'])}")

    with progress_bar(None, "soup", "seq") as bar:
        progress = labelled_steps(bar, "score ")

        result = run(list(models), kw.pop("output"), method="uniform" if uniform else "greedy",
                     on_step=on_step, progress=progress,
                     **quantize_kwargs(quantize_bits, group_size), **kw)  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    best = result["best_single"]
    click.echo(f"\ncandidates {result['built']}")
    click.echo(f"best single: {_fmt(best['score'])} ({best['model']})")
    click.echo(
        f"{result['method']} soup of {len(result['ingredients'])}: {_fmt(result['score'])} ({result['metric']})"
    )
    if result["ensemble"] is not None:
        click.echo(f"ensemble of {len(models)}: {_fmt(result['ensemble'])}")
    click.echo("\nrecipe:\n" + yaml.safe_dump(result["recipe"], sort_keys=False).rstrip())
    if result["output"]:
        click.echo(f"\nwrote {result['output']}")
