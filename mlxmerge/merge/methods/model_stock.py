"""Model Stock (Jang et al., ECCV 2024, arXiv:2403.19522).

oᵢ = xᵢ − base; cosθ = mean over pairs i<j of oᵢ·oⱼ / max(‖oᵢ‖‖oⱼ‖, 1e-6), clipped to [0, 1];
t = N·cosθ / (1 + (N−1)·cosθ); out = t·mean(xᵢ) + (1 − t)·base.
With filter_wise, θ and t are computed per slice along the last axis (per row of a matrix).
"""

from __future__ import annotations

import mlx.core as mx

from mlxmerge.errors import RecipeError
from mlxmerge.merge.methods.common import check_shapes, fsum


def model_stock(
    tensors: list[mx.array],
    base: mx.array,
    *,
    filter_wise: bool = False,
) -> mx.array:
    """Interpolate between the base and the average of ≥ 2 fine-tunes by their mutual angle.

    mergekit clips cosθ only to [-1, 1], so negative cosines give t outside [0, 1] (or a division
    by zero at cosθ = −1/(N−1)); here cosθ is clipped to [0, 1], so t ∈ [0, 1].
    """
    if not tensors:
        return base
    if len(tensors) < 2:
        raise RecipeError(
            f"model_stock needs a base and at least two other models, got {len(tensors)} besides "
            "the base."
        )
    shape = check_shapes(tensors, base)
    if filter_wise:
        w0 = base.reshape(1, -1) if base.ndim < 2 else base
        ws = [x.reshape(w0.shape) for x in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [x.reshape(-1) for x in tensors]
    offsets = [w - w0 for w in ws]
    # Per row when filter_wise, else one blocked reduction over the whole tensor.
    rowsum = (lambda p: mx.sum(p, axis=-1)) if filter_wise else fsum
    norms = [mx.sqrt(rowsum(o * o)) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            c = rowsum(offsets[i] * offsets[j]) / mx.maximum(norms[i] * norms[j], 1e-6)
            cosines.append(mx.clip(c, -1.0, 1.0))
    cos = mx.clip(mx.mean(mx.stack(cosines), axis=0), 0.0, 1.0)[..., None]
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    avg = sum(ws) / n
    return (t * avg + (1 - t) * w0).reshape(shape)
