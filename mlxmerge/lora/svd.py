"""Low-rank factors of a task vector: economy SVD in float32 on MLX's CPU stream, rank choice.

``ΔW ≈ U_r diag(s_r) V_rᵀ`` is the best rank-r approximation in Frobenius norm (Eckart–Young); the
share of ``Σ s²`` kept by the first r singular values is what ``--energy`` thresholds. mergekit's
``mergekit-extract-lora`` splits ``diag(s)`` evenly, ``B = U √s``, ``A = √s Vᵀ``, so both factors
have the same scale; we do the same.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from mlxmerge.errors import MlxmergeError


class LowRank(NamedTuple):
    """``delta ≈ b @ a`` with ``b`` (out, r), ``a`` (r, in); ``s`` every singular value (k,)."""

    b: mx.array
    a: mx.array
    s: mx.array


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


def captured(s: mx.array) -> mx.array:
    """Share of ``Σ s²`` kept by the first 1..k singular values, (k,); all ones if ``s`` is zero."""
    e = mx.cumsum(s.astype(mx.float32) ** 2)
    total = e[-1]
    return mx.where(total > 0, e / mx.maximum(total, 1e-30), mx.ones_like(e))


def choose_rank(
    s: mx.array,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
) -> int:
    """A fixed ``rank``, or the smallest rank keeping ``energy`` of ``Σ s²``; capped by
    ``max_rank`` and by the number of singular values."""
    k = s.shape[0]
    if energy is not None:
        shares = captured(s)
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
    max_rank: int | None = None,
) -> LowRank:  # fmt: skip
    """Truncated SVD factors of ``delta`` (out, in) at the chosen rank (see ``choose_rank``)."""
    u, s, vt = economy_svd(delta)
    mx.eval(u, s, vt)
    r = choose_rank(s, rank=rank, energy=energy, max_rank=max_rank)
    root = mx.sqrt(s[:r])
    return LowRank(u[:, :r] * root, root[:, None] * vt[:r], s)
