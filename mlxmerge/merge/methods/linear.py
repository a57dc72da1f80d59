"""Element-wise methods: weighted average, passthrough and NearSwap.

linear:      out = Σ wᵢ xᵢ  (/ Σ wᵢ when normalize)           Model Soups, arXiv:2203.05482
passthrough: out = scale · x                                  (frankenmerges)
nearswap:    w = clip(t / max(|a − b|, 1e-6), 0, 1); out = w·b + (1 − w)·a, a = base
"""

from __future__ import annotations

import mlx.core as mx

from mlxmerge.errors import RecipeError
from mlxmerge.merge.methods.common import check_shapes, per_model


def linear(
    tensors: list[mx.array],
    base: mx.array | None = None,
    *,
    weight: list[float],
    normalize: bool = True,
) -> mx.array:
    """Weighted sum of all models' tensors, divided by the weight sum when ``normalize``."""
    check_shapes(tensors, None)
    w, total = linear_weights(weight, len(tensors), normalize)
    out = w[0] * tensors[0]
    for wi, x in zip(w[1:], tensors[1:]):
        out = out + wi * x
    return out / total if normalize else out


def linear_weights(weight, n: int, normalize: bool) -> tuple[list[float], float]:
    """The per-model weights and their sum; RecipeError when normalizing by a zero sum."""
    w = per_model(weight, n, "weight")
    total = float(sum(w))
    if normalize and abs(total) < 1e-8:
        raise RecipeError(
            f"linear: the weights {w} sum to 0, so they cannot be normalized; "
            "set normalize: false or change the weights."
        )
    return w, total


def passthrough(
    tensors: list[mx.array],
    base: mx.array | None = None,
    *,
    scale: list[float] | float | None = None,
) -> mx.array:
    """The single input tensor, multiplied by ``scale`` when given."""
    if len(tensors) != 1:
        raise RecipeError(f"passthrough takes exactly one model per tensor, got {len(tensors)}.")
    s = per_model(scale, 1, "scale")[0]
    return tensors[0] if s is None or s == 1.0 else tensors[0] * s


def nearswap(
    tensors: list[mx.array],
    base: mx.array,
    *,
    t: float,
) -> mx.array:
    """Take the other model's value where it is within ``t`` of the base, interpolate beyond."""
    if len(tensors) != 1:
        raise RecipeError(f"nearswap takes exactly one model besides the base, got {len(tensors)}.")
    check_shapes(tensors, base)
    a, b = base, tensors[0]
    w = mx.clip(t / mx.maximum(mx.abs(a - b), 1e-6), 0.0, 1.0)
    return w * b + (1.0 - w) * a
