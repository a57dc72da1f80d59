"""Low-rank factors of a task vector: truncated SVD in float32 with MLX, and the rank choice.

``ΔW ≈ U_r diag(s_r) V_rᵀ`` is the best rank-r approximation in Frobenius norm (Eckart–Young); the
share of ``‖ΔW‖²_F = Σ s²`` kept by the first r singular values is what ``--energy`` thresholds.
mergekit's ``mergekit-extract-lora`` splits ``diag(s)`` evenly, ``B = U √s``, ``A = √s Vᵀ``, so both
factors have the same scale; we do the same.

Two ways to get the top singular triplets: the exact economy SVD (``mx.linalg.svd`` on the CPU
stream after a QR of the long side), and, when only a small rank is wanted, the randomized range
finder with power iterations of Halko, Martinsson & Tropp 2011 (arXiv:0909.4061, Alg. 4.4 + 5.1):
O(m·n·k) instead of O(m·n·min(m, n)), about 100× faster at rank 16 on 2048×5632.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from mlxmerge.errors import MlxmergeError


class LowRank(NamedTuple):
    """``delta ≈ b @ a`` with ``b`` (out, r), ``a`` (r, in); ``s`` every singular value (k,)."""

    b: mx.array
    a: mx.array
    s: mx.array  # every singular value (exact) or the top k + oversampling (randomized)
    total: float  # ‖delta‖²_F, so shares stay exact even when ``s`` is truncated


def economy_svd(x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """``x`` (m, n) → ``u`` (m, k), ``s`` (k,), ``vt`` (k, n) with k = min(m, n), float32.

    mx.linalg.svd returns the full (n, n) ``Vt``; a QR of the long side first keeps the
    work and memory at O(m·n + k²) instead of O(max(m, n)²).
    """
    x = x.astype(mx.float32)
    m, n = x.shape
    cpu = mx.cpu  # mx.linalg.svd and qr run on the CPU stream only
    if m == n:
        return mx.linalg.svd(x, stream=cpu)
    if m > n:  # x = q r, r (n, n)
        q, r = mx.linalg.qr(x, stream=cpu)
        u, s, vt = mx.linalg.svd(r, stream=cpu)
        return q @ u, s, vt
    q, r = mx.linalg.qr(x.T, stream=cpu)  # xᵀ = q r → x = rᵀ qᵀ, rᵀ (m, m)
    u, s, vt = mx.linalg.svd(r.T, stream=cpu)
    return u, s, vt @ q.T


SVD_METHODS = ("auto", "exact", "randomized")
OVERSAMPLE = 8
POWER_ITERATIONS = 3


def randomized_svd(x: mx.array, k: int, *, seed: int = 0) -> tuple[mx.array, mx.array, mx.array]:
    """Top-``k`` ``u`` (m, k), ``s`` (k,), ``vt`` (k, n) of ``x`` (m, n) by a randomized range
    finder (Halko et al. 2011, Alg. 4.4): sketch ``x G``, power iterations re-orthonormalized by QR,
    then the exact SVD of the small projection. Deterministic for a given ``seed``."""
    x = x.astype(mx.float32)
    cpu = mx.cpu
    g = mx.random.normal((x.shape[1], k), key=mx.random.key(seed))
    q = mx.linalg.qr(x @ g, stream=cpu)[0]  # (m, k)
    for _ in range(POWER_ITERATIONS):
        z = mx.linalg.qr(x.T @ q, stream=cpu)[0]  # (n, k)
        q = mx.linalg.qr(x @ z, stream=cpu)[0]
    u, s, vt = economy_svd(q.T @ x)  # (k, n): small
    return q @ u, s, vt


def captured(s: mx.array, total: float | None = None) -> mx.array:
    """Share of ``total`` (default ``Σ s²``) kept by the first 1..k singular values, (k,); all
    ones if the matrix is zero."""
    e = mx.cumsum(s.astype(mx.float32) ** 2)
    t = e[-1] if total is None else mx.array(total, dtype=mx.float32)
    return mx.where(t > 0, mx.minimum(e / mx.maximum(t, 1e-30), 1.0), mx.ones_like(e))


def choose_rank(
    s: mx.array, *, rank: int | None = None, energy: float | None = None,
    max_rank: int | None = None, total: float | None = None,
) -> int:  # fmt: skip
    """A fixed ``rank``, or the smallest rank keeping ``energy`` of ``total`` (default ``Σ s²``);
    capped by ``max_rank`` and by the number of singular values."""
    k = s.shape[0]
    if energy is not None:
        shares = captured(s, total)
        r = int(mx.sum(shares < energy - 1e-7).item()) + 1
    elif rank is not None:
        r = rank
    else:
        raise MlxmergeError("give a rank or an energy share to choose the LoRA rank")
    if max_rank is not None:
        r = min(r, max_rank)
    return max(1, min(r, k))


def low_rank(
    delta: mx.array, *, rank: int | None = None, energy: float | None = None,
    max_rank: int | None = None, method: str = "auto", seed: int = 0,
) -> LowRank:  # fmt: skip
    """Truncated SVD factors of ``delta`` (out, in) at the chosen rank (see ``choose_rank``).

    ``method``: ``exact``, ``randomized`` (needs ``rank`` or ``max_rank``), or ``auto``:
    randomized when the largest rank that can be chosen, plus oversampling, is at most a quarter
    of ``min(out, in)``, else exact."""
    k_max = min(delta.shape)
    cap = rank if rank is not None else max_rank
    if method not in SVD_METHODS:
        raise MlxmergeError(f"unknown SVD method {method!r}; use auto, exact or randomized")
    if method == "randomized" and cap is None:
        raise MlxmergeError("a randomized SVD needs --rank or --max-rank (how many values to find)")
    randomized = method == "randomized" or (
        method == "auto" and cap is not None and 4 * (cap + OVERSAMPLE) <= k_max
    )
    delta = delta.astype(mx.float32)
    total = mx.sum(delta * delta)
    if randomized:
        u, s, vt = randomized_svd(delta, min(cap + OVERSAMPLE, k_max), seed=seed)
    else:
        u, s, vt = economy_svd(delta)
    mx.eval(u, s, vt, total)
    total = total.item()
    r = choose_rank(s, rank=rank, energy=energy, max_rank=max_rank, total=total)
    root = mx.sqrt(s[:r])
    return LowRank(u[:, :r] * root, root[:, None] * vt[:r], s, total)
