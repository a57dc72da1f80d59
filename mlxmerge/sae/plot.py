"""Training-curve PNG with matplotlib (the ``plot`` extra); skipped with a warning without it."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MISSING = "matplotlib is not installed; skipping training_curve.png (pip install 'mlxmerge[plot]')"


def training_curve(history: list[dict], path: str | Path) -> Path | None:
    """Two panels against training tokens: FVU (training batches and held-out), dead fraction
    and AuxK loss; L0 (training and held-out). Returns None, with a warning, when matplotlib is
    missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning(MISSING)
        return None
    tokens = [h["tokens"] for h in history]

    def series(key):
        return [h.get(key) for h in history]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(tokens, series("fvu"), label="FVU (training batches)", color="C0")
    if "heldout_fvu" in history[-1]:
        ax1.plot(tokens, series("heldout_fvu"), label="FVU (held out)", color="C0", ls="--")
    ax1.plot(tokens, series("dead_fraction"), label="dead fraction", color="C3")
    if any(h.get("auxk") for h in history):
        ax1.plot(tokens, series("auxk"), label="AuxK loss", color="C2", ls=":")
    top = max([1.0] + [v for v in series("fvu") + series("heldout_fvu") if v is not None])
    ax1.set(xlabel="training tokens", ylabel="fraction", ylim=(0, top * 1.05),
            title="reconstruction and dead latents")  # fmt: skip
    ax1.legend()
    ax2.plot(tokens, series("l0"), label="L0 (training batches)", color="C1")
    if "heldout_l0" in history[-1]:
        ax2.plot(tokens, series("heldout_l0"), label="L0 (held out)", color="C1", ls="--")
    ax2.set(xlabel="training tokens", ylabel="active latents per token", ylim=(0, None),
            title="sparsity (L0)")  # fmt: skip
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
