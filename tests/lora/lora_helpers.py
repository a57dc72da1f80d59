"""Helpers for the LoRA tests: the rank of the planted change and how it is made."""

from __future__ import annotations

import mlx.core as mx

RANK = 4


def load_weights(folder) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def low_rank_change(w: mx.array, rank: int, key) -> mx.array:
    """A rank-``rank`` matrix with a spread spectrum, a quarter of ``w``'s norm."""
    k1, k2 = mx.random.split(key)
    u = mx.linalg.qr(mx.random.normal((w.shape[0], rank), key=k1), stream=mx.cpu)[0]
    v = mx.linalg.qr(mx.random.normal((w.shape[1], rank), key=k2), stream=mx.cpu)[0]
    s = mx.array([1.0, 0.6, 0.35, 0.2][:rank])
    d = (u * s) @ v.T
    return d * (0.25 * mx.linalg.norm(w) / mx.linalg.norm(d))
