"""Log-probabilities, KL divergence and cross-entropy from raw logits, in float32.

log p = log_softmax(raw logits); KL(P ‖ Q) = Σ_v p_v (log p_v − log q_v); CE = −log p(target).
Raw logits, not sampler-processed scores, which can hold −inf and give NaN (heretic #346).
An ensemble of models averages in probability space: log p = log mean_m p_m (model soups).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np
from mlx import nn

from mlxmerge.errors import MlxmergeError


def log_softmax(logits: mx.array) -> mx.array:
    x = logits.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def kl_divergence(base_logits: mx.array, new_logits: mx.array) -> mx.array:
    """KL(base ‖ new) over the last axis of raw logits (e.g. (n, vocab) → (n,))."""
    lp, lq = log_softmax(base_logits), log_softmax(new_logits)
    return mx.sum(mx.exp(lp) * (lp - lq), axis=-1)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """−log p(target) per position: logits (..., vocab), integer targets (...) → (...)."""
    lp = log_softmax(logits)
    return -mx.take_along_axis(lp, targets[..., None].astype(mx.int32), axis=-1)[..., 0]


def ensemble_log_probs(outputs: Sequence[mx.array]) -> mx.array:
    """log mean_m softmax(outputs[m]) over the last axis, float32."""
    lps = [log_softmax(o) for o in outputs]
    if len(lps) == 1:
        return lps[0]
    return mx.logsumexp(mx.stack(lps), axis=0) - math.log(len(lps))


def token_logprobs(
    models: Sequence[nn.Module], sequences: Sequence[Sequence[int]], *, batch_size: int = 16,
    pad_id: int = 0, progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:  # fmt: skip
    """``log p(s[t] | s[:t])`` for t = 1..len(s)-1 of every sequence (float32 arrays)."""
    if batch_size < 1:
        raise MlxmergeError(f"batch size must be at least 1 (got {batch_size})")
    out: list[np.ndarray | None] = [None] * len(sequences)
    # Right padding: causal attention keeps pad tokens out of every real position, and no cache
    # is used, so every architecture (sliding window, GQA) sees its own full-causal mask.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        n = max(len(sequences[i]) for i in idx)
        rows = [list(sequences[i]) + [pad_id] * (n - len(sequences[i])) for i in idx]
        tokens = mx.array(rows, dtype=mx.int32)
        lp = ensemble_log_probs([m(tokens[:, :-1]) for m in models])  # (batch, n-1, vocab)
        picked = np.array(mx.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0])
        for j, i in enumerate(idx):
            out[i] = picked[j, : len(sequences[i]) - 1]
        mx.clear_cache()
        if progress:
            progress(len(idx))
    return out
