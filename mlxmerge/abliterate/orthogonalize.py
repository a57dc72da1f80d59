"""Weight orthogonalization: stop a weight from writing a direction into the residual stream.

For a weight ``W`` stored ``(..., d_model, d_in)`` and a unit direction ``r``::

    W' = W − λ r (rᵀ W)          (Arditi et al. 2024, arXiv 2406.11717)

With λ = 1 the layer can no longer write ``r``: ``rᵀ W' = 0``. A bias gets ``b' = b − λ r (rᵀ b)``.
Norm-preserving variant (grimjim's "norm-preserving biprojected abliteration"): rescale each
input column of ``W'`` (a d_model vector) back to its norm in ``W``; columns stay orthogonal
to ``r``, so the ablation remains exact (rescaling rows, as heretic does, leaks ``r`` back).
An embedding ``E`` stored (vocab, d_model) gets ``E' = E − λ (E r) rᵀ``.
Post-norm blocks: the norm output is ``g ⊙ x / rms(x)``, so ``rᵀ out ∝ (g ⊙ r)ᵀ x``; ablating
``r' = normalize(g ⊙ r)`` at the sublayer output makes the residual write exactly orthogonal to r.
"""

from __future__ import annotations

import mlx.core as mx


def unit(v: mx.array) -> mx.array:
    v = v.astype(mx.float32)
    return v / mx.maximum(mx.linalg.norm(v), 1e-12)


def post_norm_direction(r: mx.array, gain: mx.array) -> mx.array:
    """The direction to ablate before a norm with per-channel gain ``gain``: normalize(g ⊙ r)."""
    return unit(gain.astype(mx.float32) * r)


def orthogonalize_weight(
    w: mx.array, r: mx.array, strength: float = 1.0, *, norm_preserving: bool = False
) -> mx.array:
    """``W − λ r (rᵀ W)`` on axis -2 of a (..., d_model, d_in) weight, in float32."""
    w = w.astype(mx.float32)
    r = unit(r)
    u = mx.einsum("d,...di->...i", r, w)  # (..., d_in): how much each input writes along r
    out = w - strength * r[:, None] * u[..., None, :]
    if norm_preserving:
        before = mx.linalg.norm(w, axis=-2, keepdims=True)
        after = mx.linalg.norm(out, axis=-2, keepdims=True)
        out = out * mx.where(after > 1e-12, before / mx.maximum(after, 1e-12), 1.0)
    return out


def orthogonalize_bias(b: mx.array, r: mx.array, strength: float = 1.0) -> mx.array:
    b = b.astype(mx.float32)
    r = unit(r)
    return b - strength * mx.sum(b * r, axis=-1, keepdims=True) * r


def orthogonalize_embedding(
    e: mx.array, r: mx.array, strength: float = 1.0, *, norm_preserving: bool = False
) -> mx.array:
    """``E − λ (E r) rᵀ`` on a (vocab, d_model) embedding (rows are what each token writes)."""
    e = e.astype(mx.float32)
    r = unit(r)
    out = e - strength * (e @ r)[:, None] * r[None, :]
    if norm_preserving:
        before = mx.linalg.norm(e, axis=-1, keepdims=True)
        after = mx.linalg.norm(out, axis=-1, keepdims=True)
        out = out * mx.where(after > 1e-12, before / mx.maximum(after, 1e-12), 1.0)
    return out


def write_component(w: mx.array, r: mx.array) -> mx.array:
    """‖rᵀ W‖ over the residual axis: how strongly a (..., d_model, d_in) weight writes r."""
    return mx.linalg.norm(mx.einsum("d,...di->...i", unit(r), w.astype(mx.float32)))
