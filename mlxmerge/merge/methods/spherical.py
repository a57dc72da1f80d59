"""Interpolation on the sphere: SLERP, NuSLERP, Multi-SLERP and the Karcher mean.

slerp(t; a=base, b): θ = arccos(â·b̂) with â = a/‖a‖_F (not normalised when ‖a‖ ≤ 1e-8);
    out = sin((1−t)θ)/sinθ · a + sin(tθ)/sinθ · b on the *un-normalised* tensors,
    and out = (1−t)a + tb when |â·b̂| > 0.9995.                       Shoemake 1985
nuslerp: the same with t = w₂/(w₁+w₂), optionally per row/column and on task vectors
    (out = base + slerp(t, a−base, b−base)); lerp only where |sinθ| < 1e-8.
multislerp: one tangent-space step of the weighted spherical mean, rescaled by Σ wᵢ‖xᵢ‖.
    https://goddard.blog/posts/multislerp-wow-what-a-cool-idea
karcher: the iterated weighted Riemannian (Karcher) mean of xᵢ/‖xᵢ‖, rescaled by Σ aᵢ‖xᵢ‖.
    https://en.wikipedia.org/wiki/Karcher_mean
"""

from __future__ import annotations

import math

import mlx.core as mx

from mlxmerge.errors import RecipeError
from mlxmerge.merge.methods.common import check_shapes, dot, fsum, norm, per_model

DOT_THRESHOLD = 0.9995


def check_t(t: float, method: str = "slerp") -> None:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise RecipeError(f"{method}: parameter 't' must lie in [0, 1], got {t!r}.")


def slerp(
    tensors: list[mx.array],
    base: mx.array,
    *,
    t: float,
    eps: float = 1e-8,
) -> mx.array:
    """Spherical interpolation from ``base`` (t=0) to the other model (t=1), mergekit semantics."""
    check_t(t)
    if len(tensors) != 1:
        raise RecipeError(f"slerp takes exactly one model besides the base, got {len(tensors)}.")
    check_shapes(tensors, base)
    v0, v1 = base, tensors[0]
    c0, c1 = slerp_coefficients(norm(v0), norm(v1), dot(v0, v1), t, eps)
    return c0 * v0 + c1 * v1


def slerp_coefficients(
    n0: mx.array, n1: mx.array, dot01: mx.array, t: float, eps: float = 1e-8
) -> tuple[mx.array, mx.array]:
    """(c0, c1) with slerp = c0·v0 + c1·v1, from ‖v0‖, ‖v1‖ and v0·v1 (scalars)."""
    # Normalise only tensors with a usable norm (mergekit's `normalize` skips norm <= eps).
    s0 = mx.where(n0 > eps, n0, 1.0)
    s1 = mx.where(n1 > eps, n1, 1.0)
    d = dot01 / (s0 * s1)
    colinear = mx.abs(d) > DOT_THRESHOLD
    theta = mx.arccos(mx.clip(d, -1.0, 1.0))
    sin_theta = mx.where(colinear, 1.0, mx.sin(theta))
    c0 = mx.where(colinear, 1.0 - t, mx.sin((1.0 - t) * theta) / sin_theta)
    c1 = mx.where(colinear, t, mx.sin(t * theta) / sin_theta)
    return c0, c1


def _nuslerp(t: float, v0: mx.array, v1: mx.array, row_wise: bool, flatten: bool) -> mx.array:
    """mergekit's ``nuslerp``: vectors along the last axis (or axis 0 when row_wise, or flat)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = mx.swapaxes(v0, 0, -1), mx.swapaxes(v1, 0, -1)

    def rowsum(x):  # one vector when flattened: use the blocked full reduction
        return fsum(x).reshape(1) if flatten else mx.sum(x, axis=-1, keepdims=True)

    def unit(x):
        return x / mx.maximum(mx.sqrt(rowsum(x * x)), 1e-7)

    cos = rowsum(unit(v0) * unit(v1))
    theta = mx.arccos(mx.clip(cos, -1.0, 1.0))
    sin_theta = mx.sin(theta)
    colinear = mx.abs(sin_theta) < 1e-8
    safe = mx.where(colinear, 1.0, sin_theta)
    res = (mx.sin((1.0 - t) * theta) * v0 + mx.sin(t * theta) * v1) / safe
    res = mx.where(colinear, (1.0 - t) * v0 + t * v1, res)
    if row_wise and not flatten:
        res = mx.swapaxes(res, 0, -1)
    return res.reshape(shape)


def nuslerp(
    tensors: list[mx.array],
    base: mx.array | None = None,
    *,
    weight: list[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> mx.array:
    """SLERP between two models with t = w₂/(w₁+w₂); with a base, SLERP of their task vectors."""
    if len(tensors) == 1:
        return tensors[0]
    if len(tensors) != 2:
        raise RecipeError(
            f"nuslerp takes exactly two models (plus an optional base), got {len(tensors)}."
        )
    check_shapes(tensors, base)
    w = per_model(weight, 2, "weight")
    total = float(w[0] + w[1])
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    if base is None:
        return _nuslerp(t, tensors[0], tensors[1], nuslerp_row_wise, nuslerp_flatten)
    a, b = tensors[0] - base, tensors[1] - base
    return base + _nuslerp(t, a, b, nuslerp_row_wise, nuslerp_flatten)


def multislerp(
    tensors: list[mx.array],
    base: mx.array | None = None,
    *,
    weight: list[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> mx.array:
    """Barycentric interpolation on the hypersphere (one exponential-map step), mergekit semantics."""
    if len(tensors) == 1:
        return tensors[0]
    shape = check_shapes(tensors, base)
    w = per_model(weight, len(tensors), "weight")
    if normalize_weights:
        total = float(sum(w))
        if abs(total) < 1e-12:
            raise RecipeError(
                f"multislerp: the weights {w} sum to 0; set normalize_weights: false."
            )
        w = [wi / total for wi in w]
    x = mx.stack([v.reshape(-1) for v in tensors])  # (n_models, numel)
    if base is not None:
        x = x - base.reshape(1, -1)
    wa = mx.array(w, dtype=mx.float32)[:, None]
    norms = mx.stack([norm(v) for v in x])[:, None]  # (n_models, 1)
    units = x / (norms + eps)
    mean = mx.sum(units * wa, axis=0)
    mean_norm = norm(mean)
    if len(tensors) == 2:
        lerp = wa[0] * x[0] + wa[1] * x[1]
    elif mean_norm.item() < eps:
        raise RecipeError(
            "multislerp: the weighted mean of the unit tensors is zero (antipodal models with "
            "balancing weights); change the weights."
        )
    mean = mean / mx.maximum(mean_norm, eps)
    dots = mx.stack([dot(u, mean) for u in units])[:, None]
    tangent = mx.sum((units - dots * mean) * wa, axis=0)
    tn = norm(tangent) + eps
    res = mean * mx.cos(tn) + tangent * (mx.sin(tn) / tn)
    res = res * mx.sum(norms[:, 0] * wa[:, 0])
    if len(tensors) == 2:
        res = mx.where(mean_norm < eps, lerp, res)
    res = res.reshape(shape)
    return res if base is None else res + base


def karcher(
    tensors: list[mx.array],
    base: mx.array | None = None,
    *,
    weight: list[float] | None = None,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> mx.array:
    """Weighted Karcher mean on the unit sphere, rescaled by the weighted mean norm.

    Unlike mergekit (which always uses uniform weights), ``weight`` is honoured; absent, uniform.
    """
    n = len(tensors)
    if n == 1:
        return tensors[0]
    shape = check_shapes(tensors, None)
    alphas = karcher_alphas(weight, n)
    x = [v.reshape(-1) for v in tensors]
    norms = [norm(v).item() for v in x]
    valid = [i for i in range(n) if norms[i] > tol and alphas[i] > 0]
    if not valid:
        return mx.zeros(shape, dtype=mx.float32)
    a_sum = sum(alphas[i] for i in valid)
    a = [alphas[i] / a_sum for i in valid]
    units = [x[i] / norms[i] for i in valid]

    u = sum(ai * ui for ai, ui in zip(a, units))
    nu = norm(u).item()
    u = units[0] if nu < tol else u / nu
    for _ in range(max_iter):
        tangent = mx.zeros_like(u)
        for ai, ui in zip(a, units):
            c = min(max(dot(u, ui).item(), -1.0), 1.0)
            theta = math.acos(c)
            if theta < tol:
                continue
            tangent = tangent + (ai * theta / math.sin(theta)) * (ui - c * u)
        nt = norm(tangent).item()
        if nt < tol:
            break
        u = math.cos(nt) * u + math.sin(nt) * (tangent / nt)
        nu = norm(u).item()
        if nu > tol:
            u = u / nu
    scale = sum(ai * ni for ai, ni in zip(alphas, norms))
    return (scale * u).reshape(shape)


def karcher_alphas(weight: list[float] | None, n: int) -> list[float]:
    """The normalized per-model weights of ``karcher`` (uniform when absent); RecipeError when
    one is negative or they do not sum to a positive number."""
    w = [1.0] * n if weight is None else per_model(weight, n, "weight")
    if any(wi is None for wi in w):
        w = [1.0] * n
    if any(wi < 0 for wi in w) or sum(w) <= 0:
        raise RecipeError(f"karcher: weights must be >= 0 with a positive sum, got {w}.")
    return [wi / sum(w) for wi in w]
