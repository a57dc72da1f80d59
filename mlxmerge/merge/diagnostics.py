"""``diff``: how far apart two models are, per layer and tensor group, before merging them.

Cosine and angle between the weights, relative norm of the difference, and with a base the
task-vector norms and the rate at which the two task vectors disagree in sign (what TIES
resolves). Sums are accumulated per group, so a group's cosine is that of the concatenation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from mlxmerge.errors import RecipeError
from mlxmerge.io import layer_index, open_checkpoint

# Below this cosine (or above this relative task-vector norm) models are not fine-tunes of one base.
DIVERGENT_COSINE = 0.9
DIVERGENT_TASK_NORM = 0.5


def tensor_group(name: str) -> str:
    for group in ("self_attn", "attention", "mlp", "experts", "norm"):
        if group in name:
            return "attn" if group in ("self_attn", "attention") else group
    return "embed" if "embed" in name or "lm_head" in name else "other"


def _stats(a: mx.array, b: mx.array, base: mx.array | None) -> mx.array:
    a, b = a.reshape(-1), b.reshape(-1)
    parts = [mx.sum(a * b), mx.sum(a * a), mx.sum(b * b), mx.sum(mx.square(a - b))]
    if base is not None:
        base = base.reshape(-1)
        ta, tb = a - base, b - base
        both = (ta != 0) & (tb != 0)
        parts += [
            mx.sum(ta * ta), mx.sum(tb * tb), mx.sum(base * base), mx.sum(ta * tb),
            mx.sum(both & (mx.sign(ta) != mx.sign(tb))).astype(mx.float32),
            mx.sum(both).astype(mx.float32),
        ]  # fmt: skip
    return mx.stack(parts)


def diff_models(
    a: str, b: str, base: str | None = None, progress: Callable[[str], None] | None = None
) -> dict:
    """Per (layer, group) statistics of A vs B (and their task vectors from BASE)."""
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    cbase = open_checkpoint(base) if base else None
    names = [n for n in ca.names() if n in cb and (cbase is None or n in cbase)]
    if not names:
        raise RecipeError(f"{a} and {b} share no tensor names; they are different architectures")
    acc: dict[tuple, mx.array] = {}
    skipped = []
    for n in names:
        shapes = {ca.shape(n), cb.shape(n)} | ({cbase.shape(n)} if cbase else set())
        if len(shapes) > 1:
            skipped.append(n)
            continue
        s = _stats(
            ca.get(n, mx.float32),
            cb.get(n, mx.float32),
            cbase.get(n, mx.float32) if cbase else None,
        )
        key = (layer_index(n), tensor_group(n))
        acc[key] = acc[key] + s if key in acc else s
        mx.eval(acc[key])
        if progress:
            progress(n)
    rows = [_row(layer, group, s.tolist(), cbase is not None) for (layer, group), s in acc.items()]
    rows.sort(key=lambda r: (-1 if r["layer"] is None else r["layer"], r["group"]))
    total = sum(acc.values()).tolist()
    overall = _row(None, "all", total, cbase is not None)
    warnings = []
    if overall["cosine"] < DIVERGENT_COSINE:
        warnings.append(
            f"cosine {overall['cosine']:.3f} between {a} and {b}: they do not look like fine-tunes "
            "of one base; averaging them is likely to break the model"
        )
    if cbase is not None:
        for who, key in ((a, "task_norm_a"), (b, "task_norm_b")):
            if overall[key] > DIVERGENT_TASK_NORM:
                warnings.append(
                    f"task vector of {who} is {overall[key]:.0%} of {base}'s norm: likely a different base"
                )
    return {"a": a, "b": b, "base": base, "rows": rows, "overall": overall,
            "skipped": skipped, "warnings": warnings}  # fmt: skip


def _row(layer, group, s: list[float], with_base: bool) -> dict:
    ab, aa, bb, d2 = s[:4]
    cos = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 1.0
    row = {
        "layer": layer,
        "group": group,
        "cosine": cos,
        "angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos)))),
        "rel_diff": math.sqrt(d2 / aa) if aa > 0 else 0.0,
    }
    if with_base:
        ta, tb, base2, tab, conflicts, both = s[4:]
        row["task_norm_a"] = math.sqrt(ta / base2) if base2 > 0 else 0.0
        row["task_norm_b"] = math.sqrt(tb / base2) if base2 > 0 else 0.0
        row["task_cosine"] = tab / math.sqrt(ta * tb) if ta > 0 and tb > 0 else 0.0
        row["sign_conflict"] = conflicts / both if both else 0.0
    return row


def plot_diff(report: dict, path: str) -> None:
    """Per-layer cosine (and sign conflicts) as a PNG; needs matplotlib (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RecipeError("--plot needs matplotlib: pip install 'mlxmerge[plot]'") from None
    rows = [r for r in report["rows"] if r["layer"] is not None]
    groups = sorted({r["group"] for r in rows})
    panels = 2 if report["base"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.5), squeeze=False)
    for g in groups:
        rs = [r for r in rows if r["group"] == g]
        axes[0][0].plot([r["layer"] for r in rs], [r["cosine"] for r in rs], marker="o", label=g)
        if panels == 2:
            axes[0][1].plot(
                [r["layer"] for r in rs], [r["sign_conflict"] for r in rs], marker="o", label=g
            )
    axes[0][0].set(xlabel="layer", ylabel="cosine(A, B)", title="weight similarity")
    axes[0][0].legend()
    if panels == 2:
        axes[0][1].set(
            xlabel="layer", ylabel="sign conflict rate", title="task-vector sign conflicts"
        )
        axes[0][1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
