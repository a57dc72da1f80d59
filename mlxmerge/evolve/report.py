"""The search's output: the best merge, its report (``evolve.json``) and the score plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlxmerge.errors import MlxmergeError


def check_plot(path: str | Path | None = None) -> None:
    """Raise a one-line error, before the search, when matplotlib is missing or ``path`` cannot
    be written (a format matplotlib lacks, a folder that does not exist)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise MlxmergeError("--plot needs matplotlib: pip install 'mlxmerge[plot]'") from None
    if path is None:
        return
    path = Path(path).expanduser()
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise MlxmergeError(f"--plot {path}: name a {', '.join(sorted(formats))} file (e.g. .png)")
    if not path.parent.is_dir():
        raise MlxmergeError(f"--plot {path}: the folder {path.parent} does not exist")


def write_plot(report: dict, path: str | Path) -> Path:
    """PNG of each candidate's search score and the best so far, against candidates evaluated."""
    check_plot()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = report["history"]
    xs = [c["index"] for c in history]
    ys = [c["score"] if c["score"] is not None else float("nan") for c in history]
    best, running = [], float("-inf")
    for y in ys:
        running = max(running, y) if not math.isnan(y) else running
        best.append(running)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(xs, ys, ".", alpha=0.5, label="candidate (search split)")
    ax.plot(xs, best, "-", drawstyle="steps-post", label="best so far")
    b = report["best"]
    ax.axhline(b["held_out"], ls="--", c="gray",
               label=f"best recipe on held-out ({b['held_out']:.3f})")  # fmt: skip
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("candidates evaluated")
    ax.set_ylabel("score (Σ weight · metric)")
    ax.set_title(f"mlxmerge evolve: {report['merge_method']}, {report['genome_size']} genes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_result(
    report: dict, output: Path, *, plot: str | Path | None, force: bool = False
) -> Path:
    """Merge the best recipe into ``output`` with ``evolve.json`` beside it, atomically (the folder
    appears complete or not at all); then the plot, if asked, where ``plot`` says."""
    from mlxmerge.io.output import atomic_folder
    from mlxmerge.merge.runner import merge

    with atomic_folder(output, force=force) as tmp:
        merge(report["best"]["recipe"], tmp, force=True)
        (tmp / "evolve.json").write_text(json.dumps(report, indent=1) + "\n")
    if plot is not None:
        write_plot(report, plot)
    return output
