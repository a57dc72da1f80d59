"""Perplexity of a model on plain texts (used by ``refusals``); KL lives in ``mlxmerge.lm``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mlx import nn


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
