"""A bounded, shuffled activation buffer refilled by forward passes: SAE training on the fly in
memory that does not grow with the number of training tokens.

SAELens's ``mixing_buffer`` (``sae_lens/training/mixing_buffer.py``): keep ``buffer_tokens``
activations; shuffle; serve the first half as training batches; when it is used up, refill the
served half from the model, shuffle the whole buffer again and serve half of it. Each token stays
in the buffer for a geometric number of rounds, so consecutive batches mix tokens from many
documents, close to the i.i.d. draws of a stored cache. Memory: ``buffer_tokens × d_in × 4``
bytes plus one forward batch, whatever ``--tokens`` is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np

from mlxmerge.sae.model import SAEError

log = logging.getLogger(__name__)


class MixingBuffer:
    """An activation source for ``train_sae`` (``d_in``, ``batch``, ``sample``, ``len``).

    ``stream()`` returns a fresh iterator of ``(n, d_in)`` float32 activation blocks (one pass
    over the data, in order); when it runs out it is started again (the data repeats, as a
    cache smaller than ``--tokens`` repeats). ``tokens_per_pass`` is how many tokens one pass
    holds (what ``len`` reports). Raises ``SAEError`` when a pass yields nothing.
    """

    def __init__(self, stream: Callable[[], Iterator[np.ndarray]], d_in: int,
                 buffer_tokens: int, tokens_per_pass: int | None = None):  # fmt: skip
        if buffer_tokens < 2:
            raise SAEError(f"the activation buffer needs at least 2 tokens, got {buffer_tokens}")
        self.d_in, self._stream, self._pass = d_in, stream, tokens_per_pass
        self._buf = np.empty((buffer_tokens, d_in), dtype=np.float32)
        self._pos = self._ready = 0  # rows [pos, ready) are shuffled and not yet served
        self._filled = 0
        self._it: Iterator[np.ndarray] | None = None
        self._left = np.empty((0, d_in), dtype=np.float32)  # rest of the last forward batch
        self.passes = 0  # passes over the data started
        self.streamed = 0  # activations read from the model
        self.peak_bytes = self._buf.nbytes

    def __len__(self) -> int:
        return int(self._pass) if self._pass is not None else len(self._buf)

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes + self._left.nbytes

    def _next_block(self) -> np.ndarray:
        for _ in range(2):  # a pass that ends at once twice in a row holds nothing
            if self._it is None:
                self._it, self.passes = self._stream(), self.passes + 1
                if self.passes == 2:
                    log.info("the data ran out after %d tokens; reading it again (repeats)",
                                self.streamed)  # fmt: skip
            block = next(self._it, None)
            if block is not None:
                return np.asarray(block, dtype=np.float32)
            self._it = None
        raise SAEError("the data yields no activations")

    def _fill(self, start: int) -> None:
        """Fill rows ``[start, capacity)`` from the model."""
        end = len(self._buf)
        while start < end:
            if not len(self._left):
                self._left = self._next_block()
                self.streamed += len(self._left)
                self.peak_bytes = max(self.peak_bytes, self.nbytes)
            take = min(end - start, len(self._left))
            self._buf[start : start + take] = self._left[:take]
            self._left = self._left[take:]
            start += take
        self._filled = end

    def _refill(self, rng: np.random.Generator) -> None:
        """Unserved rows to the front, the rest from the model, shuffle, serve half."""
        keep = self._filled - self._pos
        self._buf[:keep] = self._buf[self._pos : self._filled].copy()
        self._fill(keep)
        rng.shuffle(self._buf)  # in place, along the token axis
        self._pos, self._ready = 0, len(self._buf) // 2

    def batch(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """The next ``n`` shuffled activations, ``(n, d_in)`` float32 (each served once)."""
        out = np.empty((n, self.d_in), dtype=np.float32)
        done = 0
        while done < n:
            if self._pos >= self._ready:
                self._refill(rng)
            take = min(n - done, self._ready - self._pos)
            out[done : done + take] = self._buf[self._pos : self._pos + take]
            self._pos += take
            done += take
        return out

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``n`` activations drawn from the buffer without consuming them (initialisation
        and the final reconstruction metrics)."""
        if self._filled == 0:
            self._refill(rng)
        idx = rng.choice(self._filled, min(n, self._filled), replace=False)
        return self._buf[np.sort(idx)].copy()
