"""Compiled forms of linear, nearswap and passthrough: one pass from the stored inputs to the output."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from mlxmerge.merge.methods.common import (
    compiled,
    per_model,
)
from mlxmerge.merge.methods.kernels import blocks
from mlxmerge.merge.methods.kernels.blocks import (
    _f32,
    _flat,
)
from mlxmerge.merge.methods.linear import linear_weights
from mlxmerge.merge.methods.linear import nearswap as plain_nearswap


def _weighted_sum_kernel(n: int, normalize: bool, out_dtype: mx.Dtype):
    def build():
        def kernel(weights, total, *xs):
            out = weights[0] * xs[0].astype(mx.float32)
            for i in range(1, n):
                out = out + weights[i] * xs[i].astype(mx.float32)
            return (out / total if normalize else out).astype(out_dtype)

        return kernel

    return compiled(("wsum", n, normalize, out_dtype), build)


def linear(
    tensors: Sequence[mx.array],
    base: mx.array | None,
    out_dtype: mx.Dtype,
    *,
    weight: list[float],
    normalize: bool = True,
) -> mx.array:
    """``linear.linear`` over stored-dtype inputs in one compiled pass; evaluated, ``out_dtype``."""
    w, total = linear_weights(weight, len(tensors), normalize)
    y = _weighted_sum_kernel(len(tensors), normalize, out_dtype)(
        mx.array(w, dtype=mx.float32), mx.array(total, dtype=mx.float32), *tensors
    )
    mx.eval(y)
    return y


# --- nearswap, passthrough ---------------------------------------------------------------------


def nearswap(
    tensors: Sequence[mx.array], base: mx.array, out_dtype: mx.Dtype, *, t: float
) -> mx.array | None:
    """``linear.nearswap`` itself on float32 copies of 2M-entry blocks, cast per block.

    Not one compiled kernel: compiled CPU kernels run their division unvectorized, and MLX's
    own elementwise ops on cache-sized blocks are ~1.7× faster here (0.53 s vs 0.90 s on a
    65M-entry tensor). The same ops as the plain function, so the same bits.
    """
    if base is None or len(tensors) != 1:
        return None  # the plain function raises the message
    fa, fb = _flat([base, tensors[0]])
    out = []
    for s in range(0, fa.size, blocks.BLOCK_ENTRIES):
        a, b = (f[s : s + blocks.BLOCK_ENTRIES].astype(mx.float32) for f in (fa, fb))
        out.append(plain_nearswap([b], a, t=t).astype(out_dtype))
        mx.eval(out[-1])
    return mx.concatenate(out).reshape(base.shape)


def _scale_kernel(out_dtype: mx.Dtype):
    def build():
        return lambda s, x: (x.astype(mx.float32) * s).astype(out_dtype)

    return compiled(("scale", out_dtype), build)


def passthrough(
    tensors: Sequence[mx.array],
    base: mx.array | None,
    out_dtype: mx.Dtype,
    *,
    scale: list[float] | float | None = None,
) -> mx.array | None:
    """``linear.passthrough``: the one input times ``scale``, cast in the same pass."""
    if len(tensors) != 1:
        return None
    s = per_model(scale, 1, "scale")[0]
    x = tensors[0]
    y = x.astype(out_dtype) if s is None or s == 1.0 else _scale_kernel(out_dtype)(_f32(s), x)
    mx.eval(y)
    return y
