"""Read the next tensor's inputs in a background thread while the current one is computed.

The reader thread does plain file I/O into NumPy buffers, the NaN/Inf test on the stored bits
and the copy into an ``mx.array`` (so all three run beside the compute, on another core); it
builds no MLX graph (a lazy array must not cross threads). The merge thread only views and
computes. A semaphore of ``depth``
slots bounds how many tensors' inputs are held ahead, and a tensor whose inputs exceed
``budget`` bytes is not read ahead at all (the merge thread loads it when it gets there): peak
memory grows by at most ``budget``, whatever the model.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxmerge.io import Checkpoint, finite
from mlxmerge.io.finite import EXPONENT_MASKS

BUDGET = 128 * 1024**2  # bytes of inputs read ahead at most; larger tensors are read on demand


@dataclass
class StoredTensor:
    """A tensor's stored bytes read into memory; ``finite`` is None when not a float."""

    words: mx.array  # the raw bits as unsigned words of the element size (evaluated)
    dtype: mx.Dtype
    shape: tuple[int, ...]
    finite: bool | None

    def to_mlx(self) -> mx.array:
        return self.words.view(self.dtype).reshape(self.shape)


def read_stored(ckpt: Checkpoint, name: str) -> StoredTensor | None:
    """The stored tensor ``name`` as bits (None when it needs MLX to load: quantized, odd dtype,
    derived from other tensors, or fused with a LoRA adapter).

    Goes through ``ckpt.raw`` so that only bytes that are the tensor itself are read: a
    ``base+adapter`` checkpoint's fused tensors and a derived (split/stacked) tensor have none.
    """
    raw = ckpt.raw(name)
    if raw is None:
        return None
    dtype = raw.dtype
    if dtype not in EXPONENT_MASKS:
        return None
    word, mask = EXPONENT_MASKS[dtype]
    words = np.empty(raw.nbytes // np.dtype(word).itemsize, dtype=word)
    view = memoryview(words).cast("B")
    with open(raw.file, "rb", buffering=0) as f:
        f.seek(raw.offset)
        done = 0
        while done < raw.nbytes:  # readinto releases the GIL: the merge thread keeps computing
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"{raw.file}: file ended while reading tensor {name}")
            done += n
    view.release()
    ok = finite.words_finite(words, mask)
    # The copy into MLX memory runs here too (an evaluated array, no graph: safe in any thread)
    return StoredTensor(mx.array(words), dtype, tuple(raw.shape), ok)


class InputPrefetcher:
    """Reads, in ``order``, the inputs listed for each name, ``depth`` tensors ahead.

    ``get(name)`` must be called for the names in the same order; it returns one
    ``StoredTensor`` (or None) per (checkpoint, tensor name) reference.
    """

    def __init__(
        self,
        order: Iterable[tuple[str, list[tuple[Checkpoint, str]]]],
        depth: int = 1,
        budget: int = BUDGET,
    ):
        self.budget = budget
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(list(order),), name="mlxmerge-reader", daemon=True
        )
        self._thread.start()

    def _run(self, order) -> None:
        try:
            for name, refs in order:
                self._slots.acquire()
                if self._stop.is_set():
                    return
                size = sum(ck.entries[n].nbytes for ck, n in refs if n in ck.entries)
                if size > self.budget:  # too large to hold beside the current tensor's work
                    self._queue.put((name, [None] * len(refs)))
                else:
                    self._queue.put((name, [read_stored(ck, n) for ck, n in refs]))
        except Exception as e:  # noqa: BLE001 (handed to the merge thread at its next get())
            self._queue.put((None, e))

    def get(self, name: str) -> list[StoredTensor | None]:
        got, item = self._queue.get()
        if got is None:
            raise item
        if got != name:
            raise RuntimeError(f"prefetch order broken: expected {name}, read {got}")
        self._slots.release()  # the reader may fetch the next tensor now
        return item

    def close(self) -> None:
        self._stop.set()
        self._slots.release()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
            self._slots.release()
        self._thread.join()
