"""Compiled forms of RAM, RAM+ and Arcee Fusion (mergekit's ``fusion`` methods)."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from mlxmerge.merge.methods import common
from mlxmerge.merge.methods.common import (
    compiled,
    kth_bracket,
    kth_largest,
)
from mlxmerge.merge.methods.fusion import _KL_EPS
from mlxmerge.merge.methods.kernels import blocks
from mlxmerge.merge.methods.kernels.blocks import (
    _delta,
    _f32,
    _final,
    _flat,
    _row_spans,
)

# --- ram, ramplus_tl --------------------------------------------------------------------------


def _active(eps, base, x):
    return mx.abs(_delta(x, base)) > eps


def _count_kernel(n: int):
    # Σᵢ [|xᵢ − base| > ε] as uint8, its own kernel: fused with the rest the chain is too deep
    # for compile (it then stores whole-tensor float32 temporaries).
    def build():
        def kernel(eps, base, *xs):
            counts = _active(eps, base, xs[0]).astype(mx.uint8)
            for x in xs[1:]:
                counts = counts + _active(eps, base, x).astype(mx.uint8)
            return counts

        return kernel

    return compiled(("ramcount", n), build)


def _ram_out_kernel(n: int, boosted: bool, out_dtype: mx.Dtype):
    """base + Σᵢ over contributing models of τᵢ (only it changes the entry: times λᵢ when
    ``boosted``) or τᵢ/Σc (shared). The plain function's τᵢ·u·λ + τᵢ·s/max(Σc, 1) gives these
    same values (the other product is a zero), so the sums agree bit for bit."""

    def build():
        def kernel(eps, lam, counts, base, *xs):
            c = counts.astype(mx.float32)
            shared = c > 1
            total = 0
            for i, x in enumerate(xs):
                d = _delta(x, base)
                term = mx.where(shared, d / c, d * lam[i] if boosted else d)
                total = total + mx.where(mx.abs(d) > eps, term, 0.0)
            return (base.astype(mx.float32) + total).astype(out_dtype)

        return kernel

    return compiled(("ram", n, boosted, out_dtype), build)


def _share_kernel(stage: str, index: int):
    # model ``index``'s contributing entries that others also change ('shared') or not
    def build():
        def kernel(eps, counts, base, x):
            active = _active(eps, base, x)
            return (active & ((counts > 1) if stage == "shared" else (counts == 1))).astype(
                mx.int32
            )

        return kernel

    return compiled(("ramshare", stage, index), build)


def ram(
    tensors: Sequence[mx.array], base: mx.array, out_dtype: mx.Dtype, *, epsilon: float = 1e-5
) -> mx.array | None:
    """``fusion.ram`` in two compiled passes (the contributor counts as uint8, then the merge)."""
    return _ram(tensors, base, out_dtype, epsilon, None)


def ramplus_tl(
    tensors: Sequence[mx.array],
    base: mx.array,
    out_dtype: mx.Dtype,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> mx.array | None:
    """``fusion.ramplus_tl``: the shared/unique counts per model in one blocked pass (int32 per
    block, summed exactly in Python), λᵢ with the plain function's ops, then the RAM pass."""
    if base is None or not tensors or len(tensors) > 255:
        return None
    n = len(tensors)
    eps = _f32(epsilon)
    counts = _count_kernel(n)(eps, base, *tensors).reshape(-1)
    flat = _flat([base, *tensors])
    tally = {stage: [0] * n for stage in ("shared", "unique")}
    for s in range(0, flat[0].size, blocks.BLOCK_ENTRIES):
        c, b = counts[s : s + blocks.BLOCK_ENTRIES], flat[0][s : s + blocks.BLOCK_ENTRIES]
        for stage, i in [(stage, i) for stage in tally for i in range(n)]:
            x = flat[1 + i][s : s + blocks.BLOCK_ENTRIES]
            tally[stage][i] += mx.sum(_share_kernel(stage, i)(eps, c, b, x)).item()
    shared_n = mx.array(tally["shared"]).astype(mx.float32)
    unique_n = mx.array(tally["unique"]).astype(mx.float32)
    lam = 1 + r * mx.clip(shared_n / mx.maximum(unique_n, epsilon), 0, alpha)
    return _ram(tensors, base, out_dtype, epsilon, lam, counts.reshape(base.shape))


def _ram(tensors, base, out_dtype, epsilon, lam, counts=None):
    if base is None or not tensors or len(tensors) > 255:  # uint8 counts
        return None
    eps = _f32(epsilon)
    if counts is None:
        counts = _count_kernel(len(tensors))(eps, base, *tensors)
    kernel = _ram_out_kernel(len(tensors), lam is not None, out_dtype)
    scalars = [eps, _f32(1.0) if lam is None else lam]
    return _final(kernel, scalars, [counts, base, *tensors], len(tensors))


# --- arcee_fusion -----------------------------------------------------------------------------


def _importance_kernel():
    # |x − base|·KL(row): a subtraction, an abs and a product, so compiled or not, the same bits.
    def build():
        return lambda kl, base, x: mx.abs(x.astype(mx.float32) - base.astype(mx.float32)) * kl

    return compiled(("importance",), build)


def _fusion_kernel(out_dtype: mx.Dtype):
    def build():
        def kernel(thr, importance, base, x):
            a = base.astype(mx.float32)
            mask = (importance >= thr).astype(mx.float32)
            return (a + (x.astype(mx.float32) - a) * mask).astype(out_dtype)

        return kernel

    return compiled(("fusion", out_dtype), build)


def _order_statistics(flat: mx.array, positions: Sequence[int]) -> list[float]:
    """The values at ascending ``positions`` of an evaluated 1-D float32 array, exactly.

    ``common.kth_largest`` for several ranks at once: one seeded sample brackets each, and one
    pass over cache-sized chunks counts the entries above each bracket and gathers those inside
    (three separate calls take three passes of several whole-array temporaries each). A
    bracket that misses falls back to ``kth_largest``.
    """
    n = flat.size
    ks = [n - p for p in positions]  # the k-th largest
    if n <= common.EXACT_PARTITION_BELOW:
        return [kth_largest(flat, k) for k in ks]
    a = np.asarray(flat)  # a view of the evaluated float32 array
    sample = a[common.sample_indices(n)]
    brackets = [kth_bracket(sample, k, n) for k in ks]
    above, bands = [0] * len(ks), [[] for _ in ks]
    for s in range(0, n, blocks.BLOCK_ENTRIES):
        chunk = a[s : s + blocks.BLOCK_ENTRIES]
        for j, (lo, hi) in enumerate(brackets):
            above[j] += int(np.count_nonzero(chunk > hi))
            bands[j].append(chunk[(chunk >= lo) & (chunk <= hi)])
    values = []
    for k, n_above, parts in zip(ks, above, bands):
        band = np.concatenate(parts)
        need = k - n_above
        if 0 < need <= band.size:
            values.append(float(np.partition(band, band.size - need)[band.size - need]))
        else:
            values.append(kth_largest(flat, k))
    return values


def arcee_fusion(
    tensors: Sequence[mx.array], base: mx.array, out_dtype: mx.Dtype
) -> mx.array | None:
    """``fusion.arcee_fusion`` with one float32 tensor (the importance) and no sort.

    The per-row KL divergences come from row blocks with the plain function's ops; the three
    quantiles are exact order statistics found as ``common.kth_largest`` does (a sample brackets
    each, the entries in the bracket are ranked) instead of a full sort: the same values.
    """
    if base is None or len(tensors) != 1:
        return None
    x = tensors[0]
    shape = tuple(base.shape)
    cols = shape[-1] if len(shape) >= 1 else 1
    rows = [m.reshape(-1, cols) for m in (x, base)]
    kl = []
    for r0, r1 in _row_spans(rows[0].shape[0], cols):
        bx, bb = (m[r0:r1].astype(mx.float32) for m in rows)
        p = mx.softmax(bx, axis=-1) + _KL_EPS
        q = mx.softmax(bb, axis=-1) + _KL_EPS
        kl.append(mx.sum(p * mx.log(p / q), axis=-1, keepdims=True))
        mx.eval(kl[-1])
    importance = _importance_kernel()(mx.concatenate(kl), rows[1], rows[0])
    mx.eval(importance)
    flat = importance.reshape(-1)
    n = flat.size
    # the value at ascending index int(q·(n−1)) is the (n − index)-th largest
    idx = (np.array([0.25, 0.5, 0.75], np.float32) * np.float32(n - 1)).astype(np.int64)
    q1, med, q3 = (_f32(v) for v in _order_statistics(flat, [int(i) for i in idx]))
    thr = med + 1.5 * (q3 - q1)
    y = _fusion_kernel(out_dtype)(thr, importance, rows[1], rows[0])
    mx.eval(y)
    return y.reshape(shape)
