"""Stream tensors into sharded safetensors files with a bounded memory footprint.

The writer is told every output tensor (name, shape, dtype) up front, so it lays out the
shards and writes each header before any data; tensors then arrive one at a time, in plan
order, and go straight to disk. Peak memory is one tensor, not one shard.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlxmerge.io.dtypes import MX_TO_SAFETENSORS

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
    """Write the planned tensors, in order, into ``folder``. Use as a context manager."""

    def __init__(
        self,
        folder: Path,
        specs: list[TensorSpec],
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
    ):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the output plan")
        self.folder = Path(folder)
        self.metadata = dict(metadata or {"format": "mlx"})
        self.shards = plan_shards(specs, shard_size)
        self.files = shard_names(len(self.shards))
        self._order = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._shard = -1
        self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if self._fh:
            self._fh.close()
            self._fh = None
        if exc_type is None:
            self.close()

    @property
    def pending(self) -> list[TensorSpec]:
        return [s for _, s in self._order[self._next :]]

    def write(self, name: str, array: mx.array) -> None:
        """Write the next planned tensor; ``array`` is cast to the planned dtype."""
        if self._next >= len(self._order):
            raise ValueError(f"{name}: every planned tensor was already written")
        shard, spec = self._order[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name} next, got {name}")
        if tuple(array.shape) != spec.shape:
            raise ValueError(f"{name}: planned shape {spec.shape}, got {tuple(array.shape)}")
        if shard != self._shard:
            self._open(shard)
        array = mx.contiguous(array.astype(spec.dtype))
        mx.eval(array)
        if array.nbytes:
            # In slices: one write() of a whole large tensor ran 2-4x slower on Linux (ext4).
            data = memoryview(array).cast("B")
            for i in range(0, len(data), WRITE_CHUNK):
                self._fh.write(data[i : i + WRITE_CHUNK])
        self._next += 1

    def _open(self, shard: int) -> None:
        if self._fh:
            self._fh.close()
        self._shard = shard
        self._fh = open(self.folder / self.files[shard], "wb")  # noqa: SIM115 (spans write() calls)
        self._fh.write(_header_bytes(self.shards[shard], self.metadata))

    def close(self) -> None:
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
