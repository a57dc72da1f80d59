"""Read and validate safetensors headers without touching tensor data."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from mlxmerge.errors import CheckpointError

# Bytes per element for every dtype the safetensors format names.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# A header larger than this is not a model header (the format itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    begin: int  # byte offsets relative to the start of the data section
    end: int
    data_start: int = 0  # absolute offset of the data section (8 + header length)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate ``path``'s header; return its tensors and its ``__metadata__``."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: file is {size} bytes, too short for a safetensors header"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise CheckpointError(
                    f"{path}: header length {n} runs past the end of the {size}-byte file "
                    "(truncated or not a safetensors file)"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings")
    data_size = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(path, name, info, data_size, 8 + n)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values() if e.end > e.begin)
    for (b0, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0} and {n1} overlap in the file")
    _check_coverage(path, spans, data_size)
    return entries, metadata


def _check_coverage(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The reference reader's rule (safetensors ``validate``): the tensors, sorted by offset,
    tile the data section exactly. A gap or trailing bytes mean the header lies (a tensor
    renamed away, a shape edited) or the file holds more than it says."""
    at = 0
    for begin, end, name in spans:
        if begin != at:
            raise CheckpointError(
                f"{path}: bytes {at}-{begin} of the data section belong to no tensor (before "
                f"{name}); the header does not describe the file"
            )
        at = end
    if at != data_size:
        raise CheckpointError(
            f"{path}: the tensors end at byte {at} of a {data_size}-byte data section; the "
            "header does not describe the file"
        )


def _entry(path: Path, name: str, info, data_size: int, data_start: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        # Exact ints only: mx.load fails with a bare RuntimeError on strings, misreads bools.
        if not isinstance(dtype, str) or not isinstance(shape, list):
            raise TypeError
        if not all(type(v) is int for v in (*shape, begin, end)):
            raise TypeError
        shape = tuple(shape)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name} has a malformed header entry") from None
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{path}: tensor {name} has unknown dtype {dtype!r}")
    if any(d < 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name} has a negative dimension {shape}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name} spans {end - begin} bytes but {dtype}{list(shape)} needs {expected}"
        )
    if begin < 0 or end > data_size:
        raise CheckpointError(
            f"{path}: tensor {name} lies outside the file (bytes {begin}-{end} of {data_size}); "
            "the file is truncated"
        )
    return TensorEntry(name, dtype, shape, path, begin, end, data_start)
