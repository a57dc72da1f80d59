"""Stream tensors into sharded safetensors files with a bounded memory footprint.

The writer is told every output tensor (name, shape, dtype) up front, so it lays out the
shards and writes each header before any data; tensors then arrive one at a time, in plan
order, and go straight to disk. Peak memory is one tensor, not one shard.
"""

from __future__ import annotations

import collections
import json
import math
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlxmerge.io.dtypes import MX_TO_SAFETENSORS
from mlxmerge.io.finite import FiniteGuard

DEFAULT_SHARD_SIZE = 5 * 1000**3  # bytes, like mlx-lm's MAX_FILE_SIZE_GB
WRITE_CHUNK = 8 * 1024**2


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


@dataclass(frozen=True)
class RawTensor:
    """A tensor's stored bytes in a file, for writing unchanged without going through memory."""

    file: Path
    offset: int  # absolute byte offset in ``file``
    nbytes: int
    dtype: mx.Dtype
    shape: tuple[int, ...]
    load: Callable[[], mx.array]  # the same tensor as a lazy array, when bytes must change


def _write_all(fh, data: memoryview) -> None:
    while data:  # an unbuffered write may be partial
        data = data[fh.write(data) :]


def copy_bytes(src: Path, offset: int, nbytes: int, dst_fd: int) -> None:
    """Append ``nbytes`` of ``src`` from ``offset`` to ``dst_fd``, in the kernel where possible."""
    with open(src, "rb", buffering=0) as f:
        done = 0
        if hasattr(os, "copy_file_range"):  # Linux: no copy through user memory
            try:
                while done < nbytes:
                    n = os.copy_file_range(f.fileno(), dst_fd, nbytes - done, offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError:
                pass  # e.g. a filesystem without support: fall back to read/write below
        f.seek(offset + done)
        while done < nbytes:
            chunk = f.read(min(WRITE_CHUNK, nbytes - done))
            if not chunk:
                raise OSError(f"{src}: file ended while copying tensor bytes")
            os.write(dst_fd, chunk)
            done += len(chunk)


def parse_size(text: str | int) -> int:
    """``"5GB"`` → 5_000_000_000; powers of 1000 like mergekit and mlx-lm; ``GiB`` is 1024³."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B")
    units = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
             "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}  # fmt: skip
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * units[suffix])
    return int(float(s))


def human_bytes(n: int) -> str:
    """``213630`` → ``"213.63 KB"``: powers of 1000, the inverse of ``parse_size``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def plan_shards(specs: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Greedy in-order packing; a tensor larger than the shard size gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for s in specs:
        header[s.name] = {
            "dtype": MX_TO_SAFETENSORS[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Write the planned tensors, in order, into ``folder``. Use as a context manager.

    With ``background`` the file I/O runs in a writer thread behind a queue of ``depth``
    tensors (write-behind): the caller computes the next tensor while the last one is written.
    A tensor larger than ``budget`` bytes is written before ``write`` returns, so write-behind
    adds at most ``budget`` to peak memory.
    Arrays handed over stay referenced by the caller's side until written, so MLX buffers are
    only ever freed on the calling thread.
    """

    def __init__(
        self,
        folder: Path,
        specs: list[TensorSpec],
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
        guard: FiniteGuard | None = None,
        background: bool = False,
        depth: int = 1,
        budget: int = 128 * 1024**2,
    ):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the output plan")
        self.folder = Path(folder)
        self.metadata = dict(metadata or {"format": "mlx"})
        self.shards = plan_shards(specs, shard_size)
        self.files = shard_names(len(self.shards))
        self._order = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._specs = {s.name: s for s in specs}
        self.guard = guard  # None: no NaN/Inf checks
        self._next = 0
        self._shard = -1
        self._fh = None
        self._thread = None
        self.budget = budget
        if background:
            self._jobs: queue.Queue = queue.Queue()
            self._slots = threading.Semaphore(depth)  # tensors queued but not yet written
            self._held: collections.deque = collections.deque()  # arrays until written
            self._error: BaseException | None = None
            self._thread = threading.Thread(target=self._work, name="mlxmerge-writer", daemon=True)
            self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
            return
        self._stop()
        if self._fh:
            self._fh.close()
            self._fh = None

    @property
    def pending(self) -> list[TensorSpec]:
        return [s for _, s in self._order[self._next :]]

    # -- the background writer ------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, done = item
            item = None
            try:
                if self._error is None:
                    job()
            except Exception as e:  # noqa: BLE001 (handed to the caller at its next call)
                self._error = e
            # Drop this thread's reference to the array before the caller may release its own:
            # the last reference, and so the MLX buffer's free, stays on the calling thread.
            job = None
            done.set()
            self._slots.release()

    def _submit(self, job: Callable[[], None], hold=None) -> None:
        if self._thread is None:
            job()
            return
        self._raise_error()
        self._slots.acquire()
        while self._held and self._held[0][0].is_set():
            self._held.popleft()  # written: release the array on this (the MLX) thread
        done = threading.Event()
        self._held.append((done, hold))
        self._jobs.put((job, done))

    def _raise_error(self) -> None:
        if self._thread is not None and self._error is not None:
            err = self._error
            self._stop()
            raise err

    def _stop(self) -> None:
        if self._thread is None:
            return
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._held.clear()

    def flush(self) -> None:
        """Wait until every submitted tensor is on disk (background mode); raise its error."""
        if self._thread is None:
            return
        self._submit(lambda: None)
        self._held[-1][0].wait()
        self._raise_error()
        self._held.clear()

    # -- writing --------------------------------------------------------------------------------
    def write(self, name: str, array: mx.array) -> None:
        """Write the next planned tensor; ``array`` is cast to the planned dtype."""
        self._expect(name)
        self.write_ready(name, self.finish(name, array))

    def _expect(self, name: str) -> tuple[int, TensorSpec]:
        if self._next >= len(self._order):
            raise ValueError(f"{name}: every planned tensor was already written")
        shard, spec = self._order[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name} next, got {name}")
        return shard, spec

    def finish(self, name: str, array: mx.array) -> mx.array:
        """Cast ``array`` to ``name``'s planned dtype and evaluate it, with the NaN/Inf checks.

        Then the guard tests the inputs it watched and the output for NaN/Inf: a bit test of
        the evaluated buffers, a few ms per 100 MB (``io.finite.all_finite``).
        """
        spec = self._specs.get(name)
        if spec is None:
            raise ValueError(f"{name}: not a planned tensor")
        if tuple(array.shape) != spec.shape:
            raise ValueError(f"{name}: planned shape {spec.shape}, got {tuple(array.shape)}")
        array = mx.contiguous(array.astype(spec.dtype))
        if self.guard is None:
            mx.eval(array)
            return array
        mx.eval(array)
        self.guard.settle()
        self.guard.check_output(name, array)
        return array

    def write_ready(self, name: str, array: mx.array) -> None:
        """Write an evaluated tensor already in its planned dtype (from ``finish``): I/O only."""
        shard, _ = self._expect(name)
        self._next += 1
        self._submit(lambda: self._write_bytes(shard, array), hold=array)
        if self._thread is not None and array.nbytes > self.budget:
            self._held[-1][0].wait()  # too large to keep beside the next tensor's work
            self._raise_error()

    def _write_bytes(self, shard: int, array: mx.array) -> None:
        if shard != self._shard:
            self._open(shard)
        if array.nbytes:
            # In slices: one write() of a whole large tensor ran 2-4x slower on Linux (ext4).
            data = memoryview(array).cast("B")
            for i in range(0, len(data), WRITE_CHUNK):
                _write_all(self._fh, data[i : i + WRITE_CHUNK])

    def check_raw(self, name: str, raw: RawTensor) -> None:
        """The NaN/Inf check of a tensor copied as bytes: a streaming scan of the source."""
        if self.guard is not None:
            self.guard.check_bytes(str(raw.file.parent), name, raw.file, raw.offset,
                                   raw.nbytes, raw.dtype)  # fmt: skip

    def write_raw(self, name: str, raw: RawTensor, *, checked: bool = False) -> None:
        """Write the next planned tensor by copying its unchanged bytes from another file."""
        shard, spec = self._order[self._next] if self._next < len(self._order) else (None, None)
        if spec is None or name != spec.name:
            raise ValueError(f"expected tensor {spec.name if spec else None} next, got {name}")
        if raw.dtype != spec.dtype or tuple(raw.shape) != spec.shape or raw.nbytes != spec.nbytes:
            raise ValueError(f"{name}: raw bytes do not match the planned {spec.dtype}{spec.shape}")
        if not checked:
            self.check_raw(name, raw)
        self._next += 1
        self._submit(lambda: self._copy_raw(shard, raw))

    def _copy_raw(self, shard: int, raw: RawTensor) -> None:
        if shard != self._shard:
            self._open(shard)
        copy_bytes(raw.file, raw.offset, raw.nbytes, self._fh.fileno())

    def _open(self, shard: int) -> None:
        if self._fh:
            self._fh.close()
        self._shard = shard
        # Unbuffered: write() and write_raw()'s kernel copies share the file offset.
        self._fh = open(self.folder / self.files[shard], "wb", buffering=0)  # noqa: SIM115 (spans write() calls)
        _write_all(self._fh, memoryview(_header_bytes(self.shards[shard], self.metadata)))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._stop()
            if self._fh:
                self._fh.close()
                self._fh = None
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise ValueError(f"output incomplete: tensor {missing} was never written")
        if len(self.files) > 1:
            weight_map = {s.name: f for f, shard in zip(self.files, self.shards) for s in shard}
            total = sum(s.nbytes for shard in self.shards for s in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
