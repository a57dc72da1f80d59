"""First-token KL divergence and perplexity, from raw logits in float32.

KL(P ‖ Q) = Σ_v p_v (log p_v − log q_v) with log p = log_softmax(raw logits). Raw logits, not
sampler-processed scores, which can hold −inf and give NaN (heretic #346).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlx.core as mx
from mlx import nn

from mlxmerge.eval.generation import batches, make_batch_cache, pad_left


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
    """exp(mean next-token cross-entropy) over every predicted token of ``texts``."""
    token_lists = [tokenizer.encode(t)[:max_length] for t in texts]
    token_lists = [t for t in token_lists if len(t) >= 2]
    if not token_lists:
        from mlxmerge.errors import MlxmergeError

        raise MlxmergeError("perplexity needs texts of at least two tokens")
    total, count = 0.0, 0
    for idx in batches(token_lists, batch_size, model):
        tokens, padding = pad_left([token_lists[i] for i in idx], 0)
        logits = model(tokens[:, :-1], cache=make_batch_cache(model, padding))
        targets = tokens[:, 1:]
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
        # Predicting a real token needs a real token before it: position j ≥ padding.
        pos = mx.arange(targets.shape[1])[None, :]
        mask = pos >= mx.array(padding)[:, None]
        total += float(mx.sum(ce * mask).item())
        count += int(mx.sum(mask).item())
        if progress:
            progress(len(idx))
    return math.exp(total / count)
