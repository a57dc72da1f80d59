"""Arcee Fusion and RAM, as mergekit 0.1.5 defines them (``merge_methods/arcee_fusion.py``, ``ram.py``).

arcee_fusion (mergekit v0.1, no paper; https://arcee.ai):
    imp = |b − a| · KL(softmax(b) ‖ softmax(a))   (softmax and KL over the last axis, eps 1e-8)
    thr = median(imp) + 1.5 · (q₇₅ − q₂₅)          (quantile k = int(q·(n−1)) of the sorted values)
    out = a + (b − a) · [imp ≥ thr],  a = base
mergekit estimates the quantiles on 10⁶ entries drawn at random (with replacement) when a tensor
has more than 10⁶; mlxmerge uses every entry, so on such tensors the threshold, and the mask near
it, cannot match bit for bit. Up to 10⁶ entries both are exact and equal.

ram (Reinforced Agent Merging, arXiv:2601.13572): with task vectors τᵢ = xᵢ − base and
cᵢ = [|τᵢ| > ε], an entry where one model contributes keeps its τ; where several do, their mean:
    out = base + Σᵢ cᵢτᵢ · ([Σc = 1] + [Σc > 1] / Σc)
ramplus_tl (RAM+, tensor-local): each model's unique contributions are scaled by
    λᵢ = 1 + r · clip(sharedᵢ / max(uniqueᵢ, ε), 0, α)
where sharedᵢ / uniqueᵢ count model i's contributing entries that are shared / only its own.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxmerge.errors import RecipeError
from mlxmerge.merge.methods.common import check_shapes

_KL_EPS = 1e-8


def fusion_importance(x: mx.array, base: mx.array) -> mx.array:
    """|x − base| times the KL divergence of softmax(x) from softmax(base) along the last axis."""
    p = mx.softmax(x, axis=-1) + _KL_EPS
    q = mx.softmax(base, axis=-1) + _KL_EPS
    kl = mx.sum(p * mx.log(p / q), axis=-1, keepdims=True)
    return mx.abs(x - base) * kl


def fusion_threshold(importance: mx.array) -> float:
    """median + 1.5·IQR, each quantile the sorted value at index int(q·(n−1)) (mergekit's rule)."""
    flat = mx.sort(importance.reshape(-1))
    n = flat.shape[0]
    # float32 product then truncation, as torch computes ``(q * (n - 1)).long()``
    idx = (np.array([0.25, 0.5, 0.75], np.float32) * np.float32(n - 1)).astype(np.int64)
    q1, med, q3 = (flat[int(i)] for i in idx)
    return med + 1.5 * (q3 - q1)


def arcee_fusion(tensors: list[mx.array], base: mx.array) -> mx.array:
    """Take the other model's value where its importance reaches the tensor's outlier threshold.

    ``tensors``: the one model besides ``base``, same shape. Returns float32 of that shape.
    """
    if len(tensors) != 1:
        raise RecipeError(
            f"arcee_fusion takes exactly one model besides the base, got {len(tensors)}."
        )
    check_shapes(tensors, base)
    x = tensors[0]
    imp = fusion_importance(x, base)
    mask = (imp >= fusion_threshold(imp)).astype(x.dtype)
    return base + (x - base) * mask


def _ram_parts(tensors, base, epsilon):
    check_shapes(tensors, base)
    tv = mx.stack([x - base for x in tensors])  # (n_models, *shape)
    active = mx.abs(tv) > epsilon
    counts = active.sum(axis=0)
    return tv * active, active, counts


def ram(tensors: list[mx.array], base: mx.array, *, epsilon: float = 1e-5) -> mx.array:
    """RAM: unique task-vector entries summed, shared ones averaged over their contributors."""
    if not tensors:
        return base
    tv, _, counts = _ram_parts(tensors, base, epsilon)
    unique = (counts == 1).astype(tv.dtype)
    shared = (counts > 1).astype(tv.dtype)
    # the order of mergekit's operations, so float32 rounding matches too
    return base + (tv * unique + tv * shared / mx.maximum(counts, 1).astype(tv.dtype)).sum(axis=0)


def ramplus_tl(
    tensors: list[mx.array],
    base: mx.array,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> mx.array:
    """RAM+ (tensor-local): RAM with each model's unique entries scaled up by its overlap ratio."""
    if not tensors:
        return base
    tv, active, counts = _ram_parts(tensors, base, epsilon)
    n = len(tensors)
    flat_active = active.reshape(n, -1)
    flat_counts = counts.reshape(1, -1)
    shared_n = (flat_active & (flat_counts > 1)).sum(axis=1).astype(mx.float32)
    unique_n = (flat_active & (flat_counts == 1)).sum(axis=1).astype(mx.float32)
    lam = 1 + r * mx.clip(shared_n / mx.maximum(unique_n, epsilon), 0, alpha)
    lam = lam.reshape((n,) + (1,) * (tv.ndim - 1))
    unique = (counts == 1).astype(tv.dtype)
    shared = (counts > 1).astype(tv.dtype)
    merged = tv * unique * lam + tv * shared / mx.maximum(counts, 1).astype(tv.dtype)
    return base + merged.sum(axis=0)
