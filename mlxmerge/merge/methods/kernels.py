"""Memory-bounded, compiled forms of the elementwise methods (``MethodSpec.blocked``).

The plain methods take float32 copies of every input and run one MLX op at a time: on the CPU
each op is a pass over memory, and each float32 temporary of a large tensor is a fresh
allocation whose pages the kernel must fault in (glibc maps allocations over 32 MB anew every
time). Here the inputs stay in their stored dtype and the arithmetic is one ``mx.compile``d
kernel that casts on the fly and writes the output dtype directly: no float32 copy of a whole
tensor exists, and the whole-tensor statistics SLERP needs are summed block by block.

Same formulas as ``linear.py`` and ``spherical.py``; results agree with them to float32
rounding (a compiled kernel may fuse a multiply and an add; the statistics are summed in
1024-entry groups as ``common.fsum`` does, in another order).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from mlxmerge.merge.methods.common import BLOCK, fsum, streams
from mlxmerge.merge.methods.linear import linear_weights
from mlxmerge.merge.methods.spherical import check_t, slerp_coefficients

BLOCK_ENTRIES = 1 << 21  # entries per statistics block: 8 MB per float32 temporary

_CACHE: dict[tuple, object] = {}


def _compiled(key: tuple, build):
    if key not in _CACHE:
        _CACHE[key] = mx.compile(build())
    return _CACHE[key]


def _weighted_sum_kernel(n: int, normalize: bool, out_dtype: mx.Dtype):
    def build():
        def kernel(weights, total, *xs):
            out = weights[0] * xs[0].astype(mx.float32)
            for i in range(1, n):
                out = out + weights[i] * xs[i].astype(mx.float32)
            return (out / total if normalize else out).astype(out_dtype)

        return kernel

    return _compiled(("wsum", n, normalize, out_dtype), build)


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


def _product_kernel():
    # One output per compiled kernel: on the CPU a multi-output kernel runs ~10x slower.
    def build():
        def kernel(a, b):
            return a.astype(mx.float32) * b.astype(mx.float32)

        return kernel

    return _compiled(("product",), build)


_ONES = {}


def _level1(p: mx.array) -> mx.array:
    """Sums of 1024-entry groups of a flat block (then the tail's sum), as ``fsum``'s first
    level but through a matrix-vector product with ones: BLAS's gemv reduces ~2x faster than
    ``mx.sum`` on the CPU, with the same float32 accuracy (group sums of 1024 entries)."""
    if BLOCK not in _ONES:
        _ONES[BLOCK] = mx.ones((BLOCK,), dtype=mx.float32)
    m = p.size // BLOCK * BLOCK
    head = p[:m].reshape(-1, BLOCK) @ _ONES[BLOCK]
    return head if m == p.size else mx.concatenate([head, mx.sum(p[m:])[None]])


def norms_and_dot(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(‖a‖, ‖b‖, a·b) in float32 of two same-shape tensors of any float dtype, accurate to
    float32 rounding like ``common.norm``/``common.dot``, with float32 temporaries of one block."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    parts: list[list[mx.array]] = [[], [], []]
    product = _product_kernel()
    pair = streams()
    starts = range(0, fa.size, BLOCK_ENTRIES)
    for j, s in enumerate(starts):  # consecutive blocks on two streams: both cores
        x, y = fa[s : s + BLOCK_ENTRIES], fb[s : s + BLOCK_ENTRIES]
        with mx.stream(pair[j % 2]):
            for acc, (u, v) in zip(parts, ((x, x), (y, y), (x, y))):
                acc.append(_level1(product(u, v)))
        if j % 2 or j == len(starts) - 1:
            mx.eval([acc[-2:] for acc in parts])
    aa, bb, ab = (fsum(mx.concatenate(p)) for p in parts)
    return mx.sqrt(aa), mx.sqrt(bb), ab


def _mix_kernel(out_dtype: mx.Dtype):
    def build():
        def kernel(c, v0, v1):
            return (c[0] * v0.astype(mx.float32) + c[1] * v1.astype(mx.float32)).astype(out_dtype)

        return kernel

    return _compiled(("mix", out_dtype), build)


def slerp(
    tensors: Sequence[mx.array],
    base: mx.array,
    out_dtype: mx.Dtype,
    *,
    t: float,
    eps: float = 1e-8,
) -> mx.array | None:
    """``spherical.slerp`` over stored-dtype inputs: block-summed statistics, one compiled mix."""
    if base is None or len(tensors) != 1:
        return None  # the plain function raises the message
    check_t(t)
    n0, n1, d = norms_and_dot(base, tensors[0])
    c0, c1 = slerp_coefficients(n0, n1, d, t, eps)
    y = _mix_kernel(out_dtype)(mx.stack([c0, c1]).astype(mx.float32), base, tensors[0])
    mx.eval(y)
    return y
