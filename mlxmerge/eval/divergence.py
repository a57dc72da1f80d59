"""First-token KL divergence and perplexity, from raw logits in float32.

KL(P ‖ Q) = Σ_v p_v (log p_v − log q_v) with log p = log_softmax(raw logits). Raw logits, not
sampler-processed scores, which can hold −inf and give NaN (heretic #346).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
from mlx import nn


def log_softmax(logits: mx.array) -> mx.array:
    x = logits.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def kl_divergence(base_logits: mx.array, new_logits: mx.array) -> mx.array:
    """KL(base ‖ new) per row of (n, vocab) raw logits."""
    lp, lq = log_softmax(base_logits), log_softmax(new_logits)
    return mx.sum(mx.exp(lp) * (lp - lq), axis=-1)


def perplexity(
    model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 8,
    max_length: int = 512, progress: Callable[[int], None] | None = None,
) -> float:  # fmt: skip
    """exp(mean next-token cross-entropy) over every predicted token of ``texts``.

    One implementation serves ``refusals`` and ``eval``: ``mlxmerge.eval.scoring.perplexity``
    (texts longer than ``max_length`` are split into windows, so every token counts once).
    """
    from mlxmerge.eval.scoring import document_windows
    from mlxmerge.eval.scoring import perplexity as score

    windows = document_windows(tokenizer, list(texts), max_length)
    n_bytes = sum(len(t.encode()) for t in texts)
    return score([model], windows, n_bytes, batch_size=batch_size, progress=progress)["perplexity"]
