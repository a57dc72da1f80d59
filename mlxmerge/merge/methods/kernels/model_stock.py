"""Compiled form of Model Stock: the task vectors' norms and cosines block-summed, then one mix."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from mlxmerge.merge.methods.common import compiled
from mlxmerge.merge.methods.kernels.blocks import (
    _delta_gram,
    _delta_product_kernel,
    _final,
    _row_spans,
)

# --- model_stock -------------------------------------------------------------------------------


def _stock_mix_kernel(n: int, out_dtype: mx.Dtype):
    # t·mean(xᵢ) + (1 − t)·base, the order of model_stock's float32 ops.
    def build():
        def kernel(t, base, *xs):
            avg = 0
            for x in xs:
                avg = avg + x.astype(mx.float32)
            avg = avg / n
            return (t * avg + (1 - t) * base.astype(mx.float32)).astype(out_dtype)

        return kernel

    return compiled(("stock", n, out_dtype), build)


def _stock_t(sums: dict, n: int) -> mx.array:
    """model_stock's t from ‖oᵢ‖² (key (i, i)) and oᵢ·oⱼ (key (i, j)): scalars or per row."""
    norms = [mx.sqrt(sums[i, i]) for i in range(n)]
    cosines = [
        mx.clip(sums[i, j] / mx.maximum(norms[i] * norms[j], 1e-6), -1.0, 1.0)
        for i in range(n)
        for j in range(i + 1, n)
    ]
    cos = mx.clip(mx.mean(mx.stack(cosines), axis=0), 0.0, 1.0)[..., None]
    return n * cos / (1 + (n - 1) * cos)


def model_stock(
    tensors: Sequence[mx.array],
    base: mx.array,
    out_dtype: mx.Dtype,
    *,
    filter_wise: bool = False,
) -> mx.array | None:
    """``model_stock.model_stock`` over stored-dtype inputs.

    Whole tensor: the N(N+1)/2 offset norms and dots are block-summed, then one compiled mix.
    ``filter_wise``: per row of the last axis, row blocks of ``blocks.BLOCK_ENTRIES`` entries, the row
    sums as the plain function takes them (``mx.sum`` over the row), the mix compiled.
    """
    n = len(tensors)
    if base is None or n < 2:
        return None  # nothing to merge, or the plain function raises the message
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    mix = _stock_mix_kernel(n, out_dtype)
    if not filter_wise:
        sums = dict(zip(pairs, _delta_gram(tensors, base, pairs)))
        return _final(mix, [_stock_t(sums, n)[0].astype(mx.float32)], [base, *tensors], n)
    shape = tuple(base.shape)
    cols = shape[-1] if len(shape) >= 2 else base.size
    rows2 = [x.reshape(-1, cols) for x in (*tensors, base)]
    product = _delta_product_kernel(True)
    out = []
    for r0, r1 in _row_spans(rows2[0].shape[0], cols):
        b = rows2[-1][r0:r1]
        xs = [x[r0:r1] for x in rows2[:-1]]
        sums = {(i, j): mx.sum(product(xs[i], xs[j], b), axis=-1) for i, j in pairs}
        out.append(mix(_stock_t(sums, n), b, *xs))
        mx.eval(out[-1])
    return mx.concatenate(out).reshape(shape)
