"""Compiled forms of SLERP, NuSLERP, Multi-SLERP and the Karcher mean: block-summed norms and dots, one mix."""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from mlxmerge.merge.methods.common import (
    compiled,
    per_model,
)
from mlxmerge.merge.methods.kernels.blocks import (
    _delta,
    _delta_gram,
    _delta_product_kernel,
    _f32,
    _flat,
    _row_spans,
    block_sums,
    norms_and_dot,
)
from mlxmerge.merge.methods.spherical import check_t, karcher_alphas, slerp_coefficients


def _mix_kernel(out_dtype: mx.Dtype):
    def build():
        def kernel(c, v0, v1):
            return (c[0] * v0.astype(mx.float32) + c[1] * v1.astype(mx.float32)).astype(out_dtype)

        return kernel

    return compiled(("mix", out_dtype), build)


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


# --- nuslerp ----------------------------------------------------------------------------------


def _unit_product_kernel(with_base: bool):
    # (v0/m0)·(v1/m1) per entry, vᵢ = xᵢ (− base): the cosine's terms as ``_nuslerp`` forms them.
    def build():
        def kernel(m0, m1, x0, x1, *b):
            base = b[0] if b else None
            return (_delta(x0, base) / m0) * (_delta(x1, base) / m1)

        return kernel

    return compiled(("uprod", with_base), build)


def _nuslerp_mix_kernel(with_base: bool, out_dtype: mx.Dtype):
    def build():
        def kernel(s0, s1, safe, colinear, omt, t, x0, x1, *b):
            base = b[0] if b else None
            v0, v1 = _delta(x0, base), _delta(x1, base)
            res = (s0 * v0 + s1 * v1) / safe
            res = mx.where(colinear, omt * v0 + t * v1, res)
            return (res if base is None else base.astype(mx.float32) + res).astype(out_dtype)

        return kernel

    return compiled(("nuslerp", with_base, out_dtype), build)


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

    return compiled(("combination", n, with_base, out_dtype), build)


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
