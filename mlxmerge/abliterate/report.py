"""Report plots: per-layer separation of the refusal direction and the candidates' scores."""

from __future__ import annotations

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
