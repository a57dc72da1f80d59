"""A held-out split of an activation source: the tail of the cache, never drawn for training.

The split is by position, at a context boundary when the source knows its contexts (an
``ActivationStore``: every cached token maps to its row of ``sequences.npy``), so no held-out
token shares a context with a training token. Sources that generate fresh samples on every draw
(``fresh = True``, e.g. ``ToyData``) need no split: held-out rows are a fresh draw. Any other source
without ``rows`` (a stream) gets no held-out split, with a warning, rather than a sample of the
training rows labelled held out.
"""

from __future__ import annotations

import logging

import numpy as np

from mlxmerge.sae.model import SAEError

log = logging.getLogger(__name__)

MAX_HELD_OUT = 16384  # tokens; enough for FVU / L0 to 3 digits, cheap to evaluate


class RowRange:
    """Rows ``[start, stop)`` of a source read by index (``.rows``); the training interface."""

    def __init__(self, source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop
        self.d_in = source.d_in

    def __len__(self) -> int:
        return self.stop - self.start

    def rows(self, index: np.ndarray) -> np.ndarray:
        return self.source.rows(self.start + np.asarray(index))

    def batch(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.rows(rng.integers(0, len(self), n))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.rows(rng.choice(len(self), min(n, len(self)), replace=False))


def _context_of_each_token(source) -> np.ndarray | None:
    """(n,) row of ``sequences.npy`` each cached token comes from, when the source records it."""
    if not hasattr(source, "tokens"):
        return None
    return source.tokens()[1][:, 0]


def split_held_out(source, fraction: float, *, seed: int = 0) -> tuple[object, np.ndarray | None]:
    """``(training source, held-out rows (n_held, d_in))``; ``fraction`` of the tokens (at most
    ``MAX_HELD_OUT``) at the end of the source are held out, moved back to a context start.

    ``fraction`` 0 holds nothing out (returns ``(source, None)``). A generator (``fresh``) is
    returned whole with a fresh sample of it as the held-out rows.
    """
    if not 0 <= fraction < 1:
        raise SAEError(f"--held-out must be a fraction in [0, 1), got {fraction!r}")
    if fraction == 0:
        return source, None
    if getattr(source, "fresh", False):
        return source, source.sample(MAX_HELD_OUT, np.random.default_rng(seed + 1))
    if not hasattr(source, "rows"):
        log.warning("this activation source cannot set rows aside; nothing is held out")
        return source, None
    n = len(source)
    start = n - min(max(1, round(fraction * n)), MAX_HELD_OUT)
    context = _context_of_each_token(source)
    if context is not None:  # back to the first token of the context ``start`` falls in
        start = int(np.searchsorted(context, context[start], side="left"))
    if start < 1:
        raise SAEError(
            f"holding out {fraction:g} of {n} cached tokens leaves none to train on "
            "(the cache is one context); collect more or lower --held-out"
        )
    return RowRange(source, 0, start), source.rows(np.arange(start, n))
