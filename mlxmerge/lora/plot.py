"""``extract-lora --plot``: the share of each task vector kept against rank, per module kind."""

from __future__ import annotations

from pathlib import Path

from mlxmerge.errors import MlxmergeError
from mlxmerge.lora.write import layer_relative


def plot_captured(report: dict, path: str | Path) -> Path:
    """Mean (over layers) share of ``Σ s²`` kept at each rank, one line per module kind, with the
    chosen ranks marked; needs matplotlib (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MlxmergeError("--plot needs matplotlib: pip install 'mlxmerge[plot]'") from None
    kinds: dict[str, list[list[float]]] = {}
    chosen: dict[str, list[int]] = {}
    for row in report["modules"]:
        kind = layer_relative(row["module"])
        kinds.setdefault(kind, []).append(report["captured"][row["module"]])
        chosen.setdefault(kind, []).append(row["rank"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for kind, curves in sorted(kinds.items()):
        k = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(k)]
        (line,) = ax.plot(range(1, k + 1), mean, label=kind)
        r = round(sum(chosen[kind]) / len(chosen[kind]))
        ax.plot([r], [mean[min(r, k) - 1]], "o", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("share of ‖ΔW‖² kept")
    ax.set_ylim(0, 1.02)
    ax.set_title("LoRA extraction: task-vector energy against rank (dot: chosen rank)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
