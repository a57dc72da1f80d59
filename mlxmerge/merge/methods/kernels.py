"""Memory-bounded, compiled forms of the elementwise methods (``MethodSpec.blocked``).

The plain methods take float32 copies of every input and run one MLX op at a time: on the CPU
each op is a pass over memory, and each float32 temporary of a large tensor is a fresh
allocation whose pages the kernel must fault in (glibc maps allocations over 32 MB anew every
time). Here the inputs stay in their stored dtype and the arithmetic is one ``mx.compile``d
kernel that casts on the fly and writes the output dtype directly: no float32 copy of a whole
tensor exists, and the whole-tensor statistics SLERP needs are summed block by block.

The same holds for the methods whose statistics are whole-tensor reductions followed by
elementwise work: each statistic is a block-summed pass (``block_sums``) whose compiled kernel
rebuilds what it needs per entry from the stored inputs (task vectors, unit tensors, the mean,
the tangent), the scalars between passes use the plain function's ops, and one last kernel
writes the output. passthrough is one kernel, RAM two (counts, merge), nearswap MLX's own
ops per block; model_stock and nuslerp need one and two statistics passes; multislerp and
karcher are linear combinations of their inputs, so one Gram pass gives every norm and dot
(karcher's iterations run on N coefficients, no pass and no float32 tensor); arcee_fusion keeps
its importance in float32 and takes the quantiles as exact order statistics without a sort.
Per-row statistics (model_stock's filter_wise, nuslerp without flattening) run over blocks of
whole rows. mx.compile fuses only short chains of ops (past ~10 it stores whole-tensor float32
intermediates), so every final kernel is kept short or run per block.

Same formulas as ``linear.py``, ``spherical.py``, ``model_stock.py`` and ``fusion.py``; results
agree with them to float32 rounding (a compiled kernel may fuse a multiply and an add; the
statistics are summed in 1024-entry groups as ``common.fsum`` does, in another order; with
OpenBLAS loaded the group sums themselves round differently; multislerp and karcher combine
float64 scalars in another order), bit for bit where none applies
(``tests/merge/test_method_kernels.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from mlxmerge.merge.methods import common
from mlxmerge.merge.methods.common import (
    BLOCK,
    fsum,
    kth_bracket,
    kth_largest,
    per_model,
    streams,
)
from mlxmerge.merge.methods.fusion import _KL_EPS
from mlxmerge.merge.methods.linear import linear_weights
from mlxmerge.merge.methods.linear import nearswap as plain_nearswap
from mlxmerge.merge.methods.spherical import check_t, karcher_alphas, slerp_coefficients

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
    product = _delta_product_kernel(False)
    terms = [(product, [fa, fa], []), (product, [fb, fb], []), (product, [fa, fb], [])]
    aa, bb, ab = block_sums(terms, fa.size)
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


# --- shared machinery of the forms below -----------------------------------------------------


def block_sums(terms: Sequence[tuple], n: int) -> list[mx.array]:
    """Whole-tensor sums of several elementwise float32 products, one block at a time.

    ``terms``: ``(kernel, flats, scalars)`` each; ``kernel(*scalars, *blocks)`` returns one
    float32 block, ``blocks`` being the same ``BLOCK_ENTRIES`` span of every 1-D array in
    ``flats`` (``n`` entries each). Every sum is accurate to float32 rounding like ``fsum``
    (1024-entry groups through ``_level1``, then ``fsum`` of the group sums).
    """
    parts: list[list[mx.array]] = [[] for _ in terms]
    pair = streams()
    starts = list(range(0, n, BLOCK_ENTRIES))
    for first in range(0, len(starts), len(pair)):  # two blocks at once, one per stream
        for acc, (kernel, flats, scalars) in zip(parts, terms):
            for k, s in enumerate(starts[first : first + len(pair)]):
                with mx.stream(pair[k]):
                    blocks = (f[s : s + BLOCK_ENTRIES] for f in flats)
                    acc.append(_level1(kernel(*scalars, *blocks)))
            mx.eval(acc[first:])  # two float32 blocks alive at a time, however many terms
    return [fsum(mx.concatenate(p)) for p in parts]


def _f32(value) -> mx.array:
    return mx.array(value, dtype=mx.float32)


def _flat(xs: Sequence[mx.array | None]) -> list[mx.array | None]:
    return [None if x is None else x.reshape(-1) for x in xs]


def _row_spans(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_ENTRIES // max(cols, 1))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


FUSED_MODELS = 4  # above this many models, the last kernels are too deep for compile to fuse


def _final(kernel, scalars: Sequence[mx.array], arrays: Sequence[mx.array], n: int) -> mx.array:
    """``kernel(*scalars, *arrays)`` evaluated; over more than ``FUSED_MODELS`` models, per
    ``BLOCK_ENTRIES`` span of the flattened arrays and concatenated. compile cuts a long chain
    of ops into several kernels whose intermediates would be whole float32 tensors; over
    blocks they are block-sized."""
    if n <= FUSED_MODELS:
        y = kernel(*scalars, *arrays)
        mx.eval(y)
        return y
    flats = _flat(arrays)
    out = []
    for s in range(0, flats[0].size, BLOCK_ENTRIES):
        out.append(kernel(*scalars, *(f[s : s + BLOCK_ENTRIES] for f in flats)))
        mx.eval(out[-1])
    return mx.concatenate(out).reshape(arrays[0].shape)


def _delta(x: mx.array, base: mx.array | None) -> mx.array:
    """x in float32, minus base when there is one (a task vector), inside a kernel."""
    return x.astype(mx.float32) if base is None else x.astype(mx.float32) - base.astype(mx.float32)


def _delta_product_kernel(with_base: bool):
    # (x - base)·(y - base) per entry (or x·y without a base): the terms of norms and dots.
    def build():
        if with_base:
            return lambda x, y, b: _delta(x, b) * _delta(y, b)
        return lambda x, y: x.astype(mx.float32) * y.astype(mx.float32)

    return _compiled(("dprod", with_base), build)


def _delta_gram(xs: Sequence[mx.array], base: mx.array | None, pairs) -> list[mx.array]:
    """Block-summed (xᵢ − base)·(xⱼ − base) over whole tensors for each (i, j) in ``pairs``."""
    flat = _flat([*xs, base])
    kernel = _delta_product_kernel(base is not None)
    tail = [flat[-1]] if base is not None else []
    terms = [(kernel, [flat[i], flat[j], *tail], []) for i, j in pairs]
    return block_sums(terms, flat[0].size)


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
    for s in range(0, fa.size, BLOCK_ENTRIES):
        a, b = (f[s : s + BLOCK_ENTRIES].astype(mx.float32) for f in (fa, fb))
        out.append(plain_nearswap([b], a, t=t).astype(out_dtype))
        mx.eval(out[-1])
    return mx.concatenate(out).reshape(base.shape)


def _scale_kernel(out_dtype: mx.Dtype):
    def build():
        return lambda s, x: (x.astype(mx.float32) * s).astype(out_dtype)

    return _compiled(("scale", out_dtype), build)


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

    return _compiled(("stock", n, out_dtype), build)


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
    ``filter_wise``: per row of the last axis, row blocks of ``BLOCK_ENTRIES`` entries, the row
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


# --- nuslerp ----------------------------------------------------------------------------------


def _unit_product_kernel(with_base: bool):
    # (v0/m0)·(v1/m1) per entry, vᵢ = xᵢ (− base): the cosine's terms as ``_nuslerp`` forms them.
    def build():
        def kernel(m0, m1, x0, x1, *b):
            base = b[0] if b else None
            return (_delta(x0, base) / m0) * (_delta(x1, base) / m1)

        return kernel

    return _compiled(("uprod", with_base), build)


def _nuslerp_mix_kernel(with_base: bool, out_dtype: mx.Dtype):
    def build():
        def kernel(s0, s1, safe, colinear, omt, t, x0, x1, *b):
            base = b[0] if b else None
            v0, v1 = _delta(x0, base), _delta(x1, base)
            res = (s0 * v0 + s1 * v1) / safe
            res = mx.where(colinear, omt * v0 + t * v1, res)
            return (res if base is None else base.astype(mx.float32) + res).astype(out_dtype)

        return kernel

    return _compiled(("nuslerp", with_base, out_dtype), build)


def _nuslerp_coefficients(cos: mx.array, t: float) -> list[mx.array]:
    """sin((1−t)θ), sin(tθ), the safe sinθ, the colinear flag, 1 − t and t, with the plain
    function's ops and Python-float rounding (uncompiled: a compiled sin may round otherwise)."""
    theta = mx.arccos(mx.clip(cos, -1.0, 1.0))
    sin_theta = mx.sin(theta)
    colinear = mx.abs(sin_theta) < 1e-8
    safe = mx.where(colinear, 1.0, sin_theta)
    return [mx.sin((1.0 - t) * theta), mx.sin(t * theta), safe, colinear, _f32(1.0 - t), _f32(t)]


def nuslerp(
    tensors: Sequence[mx.array],
    base: mx.array | None,
    out_dtype: mx.Dtype,
    *,
    weight: list[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> mx.array | None:
    """``spherical.nuslerp`` over stored-dtype inputs.

    Flattened: the two norms, then the cosine of the unit vectors, block-summed in two passes
    (the plain function sums the products of the unit vectors, not the raw dot); one compiled
    mix. Per row (or per column with ``nuslerp_row_wise``) of a matrix: blocks of whole rows
    (columns), the sums taken with ``mx.sum`` over each vector as the plain function does.
    The interpolation angle θ and t enter the mix as arrays, so sin((1−t)θ) is computed in the
    kernel, as in the plain function.
    """
    if len(tensors) != 2 or (not nuslerp_flatten and base is not None and base.ndim < 2):
        return None
    if not nuslerp_flatten and tensors[0].ndim < 2:
        return None  # one vector summed by mx.sum: the plain function is cheap and exact there
    w = per_model(weight, 2, "weight")
    total = float(w[0] + w[1])
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    tail = [] if base is None else [base]
    mix = _nuslerp_mix_kernel(base is not None, out_dtype)
    if nuslerp_flatten:
        flat = _flat([*tensors, *tail])
        n0, n1 = _delta_gram(tensors, base, [(0, 0), (1, 1)])
        m0, m1 = (mx.maximum(mx.sqrt(s), 1e-7) for s in (n0, n1))
        (cos,) = block_sums(
            [(_unit_product_kernel(base is not None), flat, [m0, m1])], flat[0].size
        )
        y = mix(*_nuslerp_coefficients(cos, t), *tensors, *tail)
        mx.eval(y)
        return y
    shape = tuple(tensors[0].shape)
    # vectors along the last axis: rows of (-1, last); row_wise: columns of (first, -1).
    # axis: the one summed over; blocks of whole vectors along the other.
    axis = 0 if nuslerp_row_wise else 1
    mats = [
        x.reshape((shape[0], -1) if nuslerp_row_wise else (-1, shape[-1])) for x in tensors + tail
    ]
    length, count = mats[0].shape[axis], mats[0].shape[1 - axis]
    product = _delta_product_kernel(base is not None)
    unit_product = _unit_product_kernel(base is not None)
    out = []
    for a, b in _row_spans(count, length):
        blk = [m[:, a:b] if nuslerp_row_wise else m[a:b] for m in mats]
        extra = blk[2:]
        n0 = mx.sum(product(blk[0], blk[0], *extra), axis=axis, keepdims=True)
        n1 = mx.sum(product(blk[1], blk[1], *extra), axis=axis, keepdims=True)
        m0, m1 = (mx.maximum(mx.sqrt(s), 1e-7) for s in (n0, n1))
        cos = mx.sum(unit_product(m0, m1, *blk), axis=axis, keepdims=True)
        out.append(mix(*_nuslerp_coefficients(cos, t), *blk))
        mx.eval(out[-1])
    return mx.concatenate(out, axis=1 - axis).reshape(shape)


# --- multislerp, karcher: linear combinations of the inputs --------------------------------------


def _gram(tensors: Sequence[mx.array], base: mx.array | None) -> np.ndarray:
    """(N, N) float64 matrix of (xᵢ − base)·(xⱼ − base) (or xᵢ·xⱼ), block-summed in one pass."""
    n = len(tensors)
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    g = np.zeros((n, n))
    for (i, j), s in zip(pairs, _delta_gram(tensors, base, pairs)):
        g[i, j] = g[j, i] = s.item()
    return g


def _combination_kernel(n: int, with_base: bool, out_dtype: mx.Dtype):
    # Σ cⱼ(xⱼ − base) + base (or Σ cⱼxⱼ), cast once: a short chain, so compile fuses it whole.
    def build():
        def kernel(c, *arrays):
            xs, base = (arrays[:-1], arrays[-1]) if with_base else (arrays, None)
            out = c[0] * _delta(xs[0], base)
            for j in range(1, n):
                out = out + c[j] * _delta(xs[j], base)
            return (out if base is None else out + base.astype(mx.float32)).astype(out_dtype)

        return kernel

    return _compiled(("combination", n, with_base, out_dtype), build)


def _combine(coefficients, tensors, base, out_dtype) -> mx.array:
    c = mx.array(np.asarray(coefficients, dtype=np.float32))
    tail = [] if base is None else [base]
    y = _combination_kernel(len(tensors), base is not None, out_dtype)(c, *tensors, *tail)
    mx.eval(y)
    return y


def multislerp(
    tensors: Sequence[mx.array],
    base: mx.array | None,
    out_dtype: mx.Dtype,
    *,
    weight: list[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> mx.array | None:
    """``spherical.multislerp`` as one pass of block-summed dots and one compiled combination.

    Every vector of the method (the units, their mean, the tangent, the result) is a linear
    combination of the task vectors vᵢ = xᵢ − base (of xᵢ without a base), so each is held as
    its N coefficients and every norm and dot follows from the Gram matrix G = [vᵢ·vⱼ] in
    float64. The result is base + Σ βⱼvⱼ in one kernel. Agrees with the plain function to
    float32 rounding: its norms enter the result through cos/sin of the tangent norm, smooth.
    """
    n = len(tensors)
    if n < 2:
        return None
    w = per_model(weight, n, "weight")
    if normalize_weights:
        total = float(sum(w))
        if abs(total) < 1e-12:
            return None  # the plain function raises the message
        w = [wi / total for wi in w]
    wa = np.array(w, dtype=np.float64)
    g = _gram(tensors, base)
    norms = np.sqrt(np.diag(g))
    ne = norms + eps
    m = wa / ne  # the weighted mean of the unit vectors vᵢ/(‖vᵢ‖ + eps)
    mean_norm = math.sqrt(max(m @ g @ m, 0.0))
    if n > 2 and mean_norm < eps:
        return None  # the plain function raises the message
    h = m / max(mean_norm, eps)  # the normalized mean
    dots = (g @ h) / ne
    tangent = m - (wa @ dots) * h
    tn = math.sqrt(max(tangent @ g @ tangent, 0.0)) + eps
    beta = float(norms @ wa) * (math.cos(tn) * h + math.sin(tn) / tn * tangent)
    if n == 2 and mean_norm < eps:
        beta = wa  # the plain function's fallback: the weighted average
    return _combine(beta, tensors, base, out_dtype).reshape(tensors[0].shape)


def karcher(
    tensors: Sequence[mx.array],
    base: mx.array | None,
    out_dtype: mx.Dtype,
    *,
    weight: list[float] | None = None,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> mx.array | None:
    """``spherical.karcher`` as one pass of block-summed dots and one compiled combination.

    The running mean u, the tangent and every step stay in the span of the unit tensors
    xᵢ/‖xᵢ‖, so u is held as its coefficients and each iteration's dots and norms come from
    the Gram matrix of the units in float64: no pass over the tensors per iteration and no
    float32 tensor at all. The tangent is formed as coefficients first (no cancellation
    between large terms), so its norm, the stopping test, is as accurate as the plain
    function's float32 one. The scalar logic (clipping, skipped terms, stopping) is the plain
    function's.
    """
    n = len(tensors)
    if n < 2:
        return None
    alphas = karcher_alphas(weight, n)
    g = _gram(tensors, None)
    norms = np.sqrt(np.diag(g))
    valid = [i for i in range(n) if norms[i] > tol and alphas[i] > 0]
    if not valid:
        return mx.zeros(tensors[0].shape, dtype=out_dtype)
    nv = norms[valid]
    gu = g[np.ix_(valid, valid)] / np.outer(nv, nv)  # Gram matrix of the unit tensors
    a_sum = sum(alphas[i] for i in valid)
    a = np.array([alphas[i] / a_sum for i in valid])

    def norm(c):
        return math.sqrt(max(c @ gu @ c, 0.0))

    u = a.copy()
    nu = norm(u)
    u = np.eye(len(valid))[0] if nu < tol else u / nu
    for _ in range(max_iter):
        k = np.zeros(len(valid))
        kc = 0.0
        for i, d in enumerate(gu @ u):
            c = min(max(d, -1.0), 1.0)
            theta = math.acos(c)
            if theta < tol:
                continue
            k[i] = a[i] * theta / math.sin(theta)
            kc += k[i] * c
        tangent = k - kc * u  # Σ kᵢ(unitᵢ − cᵢu)
        nt = norm(tangent)
        if nt < tol:
            break
        u = math.cos(nt) * u + math.sin(nt) * (tangent / nt)
        nu = norm(u)
        if nu > tol:
            u = u / nu
    scale = sum(ai * ni for ai, ni in zip(alphas, norms))
    y = _combine(scale * u / nv, [tensors[i] for i in valid], None, out_dtype)
    return y.reshape(tensors[0].shape)


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

    return _compiled(("ramcount", n), build)


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

    return _compiled(("ram", n, boosted, out_dtype), build)


def _share_kernel(stage: str, index: int):
    # model ``index``'s contributing entries that others also change ('shared') or not
    def build():
        def kernel(eps, counts, base, x):
            active = _active(eps, base, x)
            return (active & ((counts > 1) if stage == "shared" else (counts == 1))).astype(
                mx.int32
            )

        return kernel

    return _compiled(("ramshare", stage, index), build)


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
    for s in range(0, flat[0].size, BLOCK_ENTRIES):
        c, b = counts[s : s + BLOCK_ENTRIES], flat[0][s : s + BLOCK_ENTRIES]
        for stage, i in [(stage, i) for stage in tally for i in range(n)]:
            x = flat[1 + i][s : s + BLOCK_ENTRIES]
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

    return _compiled(("importance",), build)


def _fusion_kernel(out_dtype: mx.Dtype):
    def build():
        def kernel(thr, importance, base, x):
            a = base.astype(mx.float32)
            mask = (importance >= thr).astype(mx.float32)
            return (a + (x.astype(mx.float32) - a) * mask).astype(out_dtype)

        return kernel

    return _compiled(("fusion", out_dtype), build)


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
    sample = np.sort(a[np.random.default_rng(0).integers(0, n, common.SAMPLE_SIZE)])
    brackets = [kth_bracket(sample, k, n) for k in ks]
    above, bands = [0] * len(ks), [[] for _ in ks]
    for s in range(0, n, BLOCK_ENTRIES):
        chunk = a[s : s + BLOCK_ENTRIES]
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
