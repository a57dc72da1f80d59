"""``abliterate`` and ``refusals``: remove the refusal direction, measure refusals."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlxmerge.cli import cli
from mlxmerge.cli.compute import compute_dtype_option
from mlxmerge.cli.models import FORMAT_HELP, LAYOUT, allow_nonfinite_option, gguf_type_option
from mlxmerge.cli.progress import progress_bar


class _Bars:
    """One tqdm bar per stage, fed by the library's (stage, advance, total) callback."""

    def __init__(self):
        self.bars = {}

    def __call__(self, stage: str, advance: int, total: int):
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = progress_bar(total, stage)
        bar.update(advance)
        if bar.n >= total:
            bar.close()

    def close(self):
        for bar in self.bars.values():
            bar.close()


def _say(message: str) -> None:
    """Messages for the user before slow stages (refusal rate, search plan), on stderr."""
    click.echo(message, err=True)


def _rate(summary: dict) -> str:
    from mlxmerge.eval.refusal import format_rate

    return format_rate(summary)


def _short(text: str, width: int = 160) -> str:
    t = " ".join(text.split())
    return (t[:width] + "…") if len(t) > width else (t or "(empty)")


def _template(value: str | None) -> str | None:
    if value is None:
        return None
    from mlxmerge.io.text import read_text

    if Path(value).is_file():
        return read_text(value, "chat template")
    if "{{" not in value and "{%" not in value:  # e.g. a template's name ("chatml")
        raise click.BadParameter(
            f"{value!r} is neither a file nor a Jinja template", param_hint="--template"
        )
    return value


def _markers(path: str | None):
    from mlxmerge.eval.refusal import REFUSAL_MARKERS, read_markers

    return read_markers(path) if path else REFUSAL_MARKERS


prompt_options = [
    click.option("--harmful", type=click.Path(), help="Harmful prompts (.txt, .jsonl, .csv); default: bundled."),
    click.option("--harmless", type=click.Path(), help="Harmless prompts; default: bundled."),
    click.option("--column", help="Column of .jsonl/.csv prompt files (default: prompt, text, instruction, goal)."),
    click.option("--system", help="System prompt for every chat (default: none)."),
    click.option("--template", help="Chat template (Jinja file or string) when the tokenizer has none."),
    click.option("--max-tokens", default=100, show_default=True, help="Answer tokens generated to detect refusals."),
    click.option("--batch-size", default=16, show_default=True, help="Prompts per forward pass."),
    click.option("--markers", type=click.Path(), help="Refusal markers file, one per line (default: built-in list)."),
    click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts."),
]  # fmt: skip


def _with(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output model folder.")
@_with(prompt_options)
@click.option(
    "--layers",
    default="auto",
    show_default=True,
    help="Layers whose writers are edited: auto (all), 12-18, 3,5-7.",
)
@click.option(
    "--direction-layer",
    default="auto",
    show_default=True,
    help="Residual points searched for the direction: auto (1 to 80% of the layers), N (fixed) or A-B / a comma list.",
)
@click.option(
    "--positions",
    default="auto",
    show_default=True,
    help="Post-instruction positions searched: auto (all) or negative indices, e.g. -1,-2 or -5..-1.",
)
@click.option(
    "--top-candidates",
    default=8,
    show_default=True,
    help="Candidates measured exactly after ranking all by a first-order estimate (0: measure all).",
)
@click.option("--strength", default=1.0, show_default=True, help="λ in W ← W − λ r rᵀ W.")
@click.option(
    "--trials",
    default=0,
    show_default=True,
    help="Heretic-style kernel search trials (0: Arditi selection only).",
)
@click.option(
    "--pick",
    type=int,
    help="Pareto-front index to export after --trials (default: fewest refusals with KL ≤ 0.1).",
)
@click.option("--seed", default=0, show_default=True, help="Seed for prompt splits and the search.")
@click.option(
    "--projected/--no-projected",
    default=True,
    show_default=True,
    help="Remove the harmless-mean component from the direction.",
)
@click.option("--norm-preserving", is_flag=True, help="Keep each input column's norm (grimjim).")
@click.option(
    "--embeddings",
    is_flag=True,
    help="Also edit the token embedding (tied: changes the LM head too).",
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default="bfloat16",
    show_default=True,
)
@click.option("--format", "layout", type=LAYOUT, default="mlx", show_default=True, help=FORMAT_HELP)
@gguf_type_option
@click.option(
    "--quantize",
    "bits",
    type=click.Choice(["4", "8"]),
    help="Re-quantize the output (warns when it wipes the edit).",
)
@click.option("--group-size", default=64, show_default=True)
@click.option(
    "--adapter",
    is_flag=True,
    help="Write a rank-1 mlx-lm LoRA adapter instead of a model (exact on a quantized base; load with mlx_lm.load(MODEL, adapter_path=OUTPUT)).",
)
@click.option("--no-eval", is_flag=True, help="Skip the before/after evaluation on test prompts.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@allow_nonfinite_option
@compute_dtype_option
def abliterate(model, output, harmful, harmless, column, system, template, max_tokens, batch_size,
               markers, as_json, layers, direction_layer, positions, top_candidates, strength,
               trials, pick, seed, projected, norm_preserving, embeddings, dtype, layout, gguf_type,
               bits, group_size, adapter, no_eval, force, allow_nonfinite):  # fmt: skip
    """Remove the refusal direction from MODEL and write the edited model to OUTPUT."""
    from mlxmerge.abliterate.pipeline import abliterate as run
    from mlxmerge.io import Quantization

    bars = _Bars()
    quiet = click.get_current_context().find_root().obj.get("quiet")
    try:
        report = run(
            model, output, harmful=harmful, harmless=harmless, column=column, layers=layers,
            direction_layer=direction_layer, positions=positions, top_candidates=top_candidates,
            strength=strength, trials=trials, pick=pick,
            seed=seed, system=system, template=_template(template), batch_size=batch_size,
            max_tokens=max_tokens, markers=_markers(markers), projected=projected,
            norm_preserving=norm_preserving, embeddings=embeddings, dtype=dtype, layout=layout,
            quantize=Quantization(int(bits), group_size) if bits else None, adapter=adapter,
            evaluate=not no_eval, allow_nonfinite=allow_nonfinite, gguf_type=gguf_type,
            force=force, progress=bars, notify=None if quiet else _say,
        )  # fmt: skip
    finally:
        bars.close()
    if as_json:
        report = {k: v for k, v in report.items() if k not in ("candidates", "screening")}
        report["direction"] = {k: v for k, v in report["direction"].items() if k != "vector"}
        click.echo(json.dumps(report, indent=2))
        return
    d = report["direction"]
    click.echo(f"direction: residual point {d['layer']}, position {d['position']}")
    click.echo(f"  why: {d['why']}")
    if "search" in report:
        s = report["search"]
        click.echo(f"search: {s['trials']} trials, Pareto front (picked {s['picked']}):")
        for i, t in enumerate(s["front"]):
            mark = "*" if i == s["picked"] else " "
            click.echo(
                f"  {mark}[{i}] refusals {t['refusal_rate']:.0%}  KL {t['kl']:.4f}  trial {t['trial']}"
            )
    if "before" in report:
        b, a = report["before"], report["after"]
        n = report["n_test"]
        click.echo(f"{'held-out test':<28}{'before':>30}{'after':>30}")
        click.echo(
            f"{'refusals (harmful, n=' + str(n['harmful']) + ')':<28}{_rate(b['refusal']):>30}{_rate(a['refusal']):>30}"
        )
        click.echo(
            f"{'refusals (harmless, n=' + str(n['harmless']) + ')':<28}{_rate(b['harmless_refusal']):>30}{_rate(a['harmless_refusal']):>30}"
        )
        click.echo(f"{'first-token KL (harmless)':<28}{0:>30.4f}{a['kl']:>30.4f}")
        click.echo(f"{'identical harmless answers':<28}{'':>30}{a['same_harmless_answers']:>30.0%}")
        click.echo("(refusals: marker judge on greedy answers; 95% Wilson intervals)")
        for x in report.get("samples", [])[:3]:
            click.echo(f"\n{x['kind']}: {_short(x['prompt'])}")
            for tag in ("before", "after"):
                verdict = "REFUSAL" if x[f"{tag}_refusal"] else "answer"
                click.echo(f"  {tag:<6} [{verdict}] {_short(x[tag])}")
    if "quantization_residual" in report:
        click.echo(
            f"re-quantization noise along r: {report['quantization_residual']:.0%} of the edit"
        )
    click.echo(f"wrote {output}" + (f" (plot: {report['plot']})" if report.get("plot") else ""))


@cli.command()
@click.argument("model")
@click.option(
    "--compare", help="A second model (e.g. the base) for KL and identical-answer counts."
)
@_with(prompt_options)
@click.option(
    "--text", "text", type=click.Path(), help="Text file (one document per line) for perplexity."
)
@click.option("--limit", type=int, help="Use only the first N prompts of each set.")
@click.option(
    "--answers",
    default=0,
    show_default=True,
    help="Show the first N prompts of each set with the answer and the judge's verdict.",
)
@click.option(
    "--judge",
    help="A local chat model (path or hub id) that also judges every answer (StrongREJECT's refusal question, yes/no from its logits).",
)
@compute_dtype_option
def refusals(model, compare, harmful, harmless, column, system, template, max_tokens, batch_size,
             markers, as_json, text, limit, answers, judge):  # fmt: skip
    """Refusal rate of MODEL on harmful prompts, false refusals on harmless ones, KL vs --compare."""
    from mlxmerge.abliterate.evaluate import refusals as run

    bars = _Bars()
    try:
        out = run(
            model, compare=compare, harmful=harmful, harmless=harmless, column=column,
            max_tokens=max_tokens, batch_size=batch_size, markers=_markers(markers),
            system=system, template=_template(template), text=text, limit=limit, answers=answers,
            judge=judge, progress=bars,
        )  # fmt: skip
    finally:
        bars.close()
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for name, row in out["models"].items():
        for kind, rows in row.get("answers", {}).items():
            click.echo(f"{Path(name).name}: {kind} prompts")
            for x in rows:
                verdict = "REFUSAL" if x["refusal"] else "answer"
                if "judge" in x:
                    verdict += f", judge: {'REFUSAL' if x['judge'] else 'answer'} (p={x['judge_p_yes']:.2f})"
                click.echo(f"  [{verdict}] {_short(x['prompt'], 100)}")
                click.echo(f"      {_short(x['answer'], 300)}")
            click.echo("")
    cols = ["refusal", "harmless_refusal", "kl_vs_compare", "same_harmless_answers", "perplexity"]
    heads = ["refusals", "false refusals", "KL vs compare", "same answers", "perplexity"]
    used = [i for i, c in enumerate(cols) if any(c in row for row in out["models"].values())]
    widths = [30 if cols[i] in ("refusal", "harmless_refusal") else 14 for i in used]
    click.echo(f"{'model':<28}" + "".join(f"{heads[i]:>{w}}" for i, w in zip(used, widths)))
    for name, row in out["models"].items():
        cells = []
        for i, w in zip(used, widths):
            v = row.get(cols[i])
            if v is None:
                cells.append(f"{'':>{w}}")
            elif isinstance(v, dict):
                cells.append(f"{_rate(v):>{w}}")
            elif cols[i] in ("kl_vs_compare", "perplexity"):
                cells.append(f"{v:>{w}.4f}")
            else:
                cells.append(f"{v:>{w}.0%}")
        click.echo(f"{Path(name).name[:27]:<28}" + "".join(cells))
        j = row.get("judge")
        if j:
            a = j["agreement_with_markers"]
            click.echo(
                f"{'  judged by ' + Path(j['model']).name[:15]:<28}{_rate(j['refusal']):>30}"
                f"{_rate(j['harmless_refusal']):>30}  (agrees with the markers on "
                f"{a['agreement']:.0%} of {a['n']}, kappa {a['kappa']:.2f})"
            )
    click.echo(
        f"({out['n_harmful']} harmful, {out['n_harmless']} harmless prompts, {max_tokens} answer "
        "tokens; refusals by the marker judge, refused/n and the 95% Wilson interval)"
    )
