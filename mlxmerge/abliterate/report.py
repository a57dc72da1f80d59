"""Report plots: per-layer separation of the refusal direction and the candidates' scores."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def plot_report(report: dict, path: str | Path) -> Path | None:
    """Save a two-panel PNG; returns None (and logs) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; skipping the plot (pip install mlxmerge[plot])")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    sep = report.get("separation", [])
    ax1.plot(range(len(sep)), sep, marker="o")
    d = report.get("direction", {})
    if d.get("layer") is not None:
        ax1.axvline(d["layer"], color="red", linestyle="--", label="chosen")
        ax1.legend()
    ax1.set(xlabel="residual point (layer input)", ylabel="‖μ_harmful − μ_harmless‖ / ‖μ‖",
            title=f"refusal-direction separation (position {d.get('position')})")  # fmt: skip
    cands = [c for c in report.get("candidates", []) if c["bypass"] == c["bypass"]]
    for pos in sorted({c["position"] for c in cands}):
        pts = sorted((c["layer"], c["bypass"]) for c in cands if c["position"] == pos)
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"pos {pos}")
    ax2.set(xlabel="candidate layer", ylabel="refusal log-odds after ablation (lower = fewer)",
            title="candidates")  # fmt: skip
    if cands:
        ax2.legend(fontsize=7, ncol=2)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def public_report(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def rewrite_report(folder: Path, report: dict) -> None:
    """Replace the report and card with the final numbers (written to a temp file, then renamed)."""
    import os

    for fname, text in (
        ("abliteration.json", json.dumps(public_report(report), indent=2)),
        ("README.md", None),
    ):
        path = folder / fname
        if text is None:
            old = path.read_text()
            head, _, _ = old.partition("\n## Abliteration\n")
            text = head.rstrip() + "\n\n" + card_markdown(report) + "\n"
        tmp = path.with_name(f".{fname}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def card_markdown(report: dict) -> str:
    d = report.get("direction", {})
    lines = [
        "## Abliteration",
        "",
        (
            "Made with `mlxmerge abliterate`: the refusal direction r (difference of mean residual "
            "activations on harmful and harmless prompts, Arditi et al. 2024, arXiv 2406.11717) "
            "was removed from every edited residual writer, W ← W − λ r rᵀ W."
        ),
        "",
        (
            f"- direction: residual point {d.get('layer')} (input of layer {d.get('layer')}), "
            f"position {d.get('position')}; {d.get('why', '')}"
        ),
        f"- edited layers: {_ranges(report.get('edited_layers', []))}; strength λ = {report.get('strength')}",
        f"- projected direction: {report.get('projected')}; norm-preserving: {report.get('norm_preserving')}; "
        f"embeddings edited: {report.get('embeddings')}"
        + (" (tied: the LM head changes too)" if report.get("embeddings") and report.get("tied_embeddings") else ""),
    ]  # fmt: skip
    if "search" in report:
        s = report["search"]
        lines.append(f"- heretic-style search: {s['trials']} trials, picked trial {s['picked']}")
    if "base_val_refusal" in report:
        v = report["base_val_refusal"]
        lines.append(f"- base model's refusals on the harmful validation prompts: {_rate(v)}")
    if "before" in report:
        b, a = report["before"], report["after"]
        lines += [
            "",
            "| held-out test | before | after |",
            "|---|---|---|",
            f"| refusal rate, harmful ({report['n_test']['harmful']} prompts) | {_rate(b.get('refusal'), b['refusal_rate'])} | {_rate(a.get('refusal'), a['refusal_rate'])} |",
            f"| refusal rate, harmless ({report['n_test']['harmless']} prompts) | {_rate(b.get('harmless_refusal'), b['harmless_refusal_rate'])} | {_rate(a.get('harmless_refusal'), a['harmless_refusal_rate'])} |",
            f"| first-token KL(base ‖ edited), harmless | 0 | {a['kl']:.4f} |",
            f"| identical harmless answers | | {a['same_harmless_answers']:.0%} |",
            "",
            "Refusal rates: marker judge on greedy answers; refused/n and the 95% Wilson interval.",
        ]  # fmt: skip
    if report.get("samples"):
        lines += ["", "### Sample answers (held-out test prompts)", ""]
        for x in report["samples"]:
            lines += [
                f"**{x['kind']}:** {_one_line(x['prompt'])}",
                "",
                f"- before ({'refusal' if x['before_refusal'] else 'answer'}): {_one_line(x['before'])}",
                f"- after ({'refusal' if x['after_refusal'] else 'answer'}): {_one_line(x['after'])}",
                "",
            ]
    if "quantization_residual" in report:
        lines.append(
            f"\nRe-quantization noise along r is {report['quantization_residual']:.0%} of the "
            "edit's size (0% is an exact edit)."
        )
    return "\n".join(lines)


def _rate(summary: dict | None, rate: float | None = None) -> str:
    from mlxmerge.eval.refusal import format_rate

    return f"{rate:.0%}" if summary is None else format_rate(summary)


def _one_line(text: str, width: int = 200) -> str:
    t = " ".join(text.split()).replace("|", "\\|")
    return (t[:width] + "…") if len(t) > width else (t or "(empty)")


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
        if x is not None:
            start = prev = x
    return ", ".join(out)
