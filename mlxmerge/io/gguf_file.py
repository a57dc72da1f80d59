"""The GGUF container: parse and validate the header and tensor table, find a model's files.

Parsed here rather than with ``gguf.GGUFReader`` (which takes seconds on a large vocabulary and
raises bare ValueErrors): a few ms, and every check runs before any tensor is read — magic and
version, each tensor's type (one ``gguf`` can decode), row size a multiple of the block, byte
range inside the file, no overlaps; a split model (``-0000k-of-0000n.gguf``) must have every part.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from mlxmerge.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
SPLIT = re.compile(r"^(?P<base>.*)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$")
# Stored float types, read as they are (the rest is dequantized).
FLOAT_TYPES = ("F32", "F16", "BF16")

_SCALARS = {  # GGUF value type → struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip


class _Truncated(Exception):
    pass


class _Cursor:
    """Little-endian reads from a memory-mapped header; running off the end raises _Truncated."""

    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def scalar(self, fmt: str):
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise _Truncated from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise _Truncated
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item, n = self.scalar("<I"), self.scalar("<Q")
            if item in _SCALARS:  # numeric arrays in one read
                size = struct.calcsize(_SCALARS[item])
                if self.pos + n * size > len(self.buf):
                    raise _Truncated
                arr = np.frombuffer(self.buf, _SCALARS[item], n, self.pos)
                self.pos += n * size
                return arr.tolist()
            return [self.value(item) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {vtype}")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored: GGUF name, ggml type, numpy-order shape, absolute byte range."""

    name: str
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows last-but-one), the reverse of GGUF's dims
    file: Path
    offset: int
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    fields: dict[str, object]
    tensors: list[GGUFTensor]


def read_gguf_header(path: Path) -> GGUFFile:
    """Parse and validate ``path``'s metadata and tensor table; no tensor data is read.

    Raises CheckpointError (one line, naming the file) for a file that is not GGUF, a version
    other than 2/3, a truncated header, an unknown or undecodable tensor type, or a tensor whose
    bytes lie outside the file or overlap another's.
    """
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 24:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a GGUF header")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return _parse(path, buf, size)
    except _Truncated:
        raise CheckpointError(
            f"{path}: the GGUF header runs past the end of the {size}-byte file (truncated)"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{path}: malformed GGUF header ({e})") from None
    finally:
        buf.close()


def _parse(path: Path, buf, size: int) -> GGUFFile:
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic number)")
    c = _Cursor(buf, 4)
    version = c.scalar("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
    if n_tensors > size or n_kv > size:  # each entry takes bytes: a garbage count
        raise _Truncated
    fields: dict[str, object] = {}
    for _ in range(n_kv):
        key = c.string()
        fields[key] = c.value(c.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.scalar("<I")
        if n_dims > 8:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = [c.scalar("<Q") for _ in range(n_dims)]
        infos.append((name, dims, c.scalar("<I"), c.scalar("<Q")))
    align = int(fields.get("general.alignment", 32))
    if align <= 0 or align & (align - 1):
        raise ValueError(f"general.alignment {align} is not a power of two")
    data_start = c.pos + (-c.pos) % align
    tensors, seen = [], set()
    for name, dims, raw_type, offset in infos:
        if name in seen:
            raise CheckpointError(f"{path}: tensor {name} appears twice")
        seen.add(name)
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise CheckpointError(
                f"{path}: tensor {name} has unknown ggml type {raw_type}; this gguf package "
                f"({gguf.__name__}) does not know it"
            ) from None
        if qtype.name not in FLOAT_TYPES and qtype not in gguf.quants._type_traits:
            raise CheckpointError(
                f"{path}: tensor {name} is stored as {qtype.name}, which gguf cannot dequantize"
            )
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shape = tuple(int(d) for d in reversed(dims))
        if shape and shape[-1] % block:
            raise CheckpointError(
                f"{path}: tensor {name} rows of {shape[-1]} do not split into {qtype.name} "
                f"blocks of {block}"
            )
        nbytes = math.prod(shape) // block * type_size
        begin = data_start + offset
        if offset % align or begin + nbytes > size:
            raise CheckpointError(
                f"{path}: tensor {name} lies outside the file (bytes {begin}-{begin + nbytes} "
                f"of {size}); the file is truncated or corrupt"
            )
        tensors.append(GGUFTensor(name, qtype, shape, path, begin, nbytes))
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0} and {n1} overlap in the file")
    return GGUFFile(path, fields, tensors)


# -- which files make one model ------------------------------------------------------------


def gguf_files(path: Path) -> list[Path] | None:
    """The GGUF file(s) of one model at ``path`` (a .gguf file, one part of a split model, or a
    folder holding one model's .gguf files); None when ``path`` is no GGUF reference."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            return None
        m = SPLIT.match(path.name)
        return _split_parts(path.parent, m["base"], int(m["n"])) if m else [path]
    if not path.is_dir():
        return None
    found = sorted(path.glob("*.gguf"))
    if not found:
        return None
    models = {}
    for f in found:
        m = SPLIT.match(f.name)
        models.setdefault(m["base"] if m else f.stem, []).append(f)
    if len(models) > 1:
        listed = ", ".join(sorted(p.name for p in found))
        raise CheckpointError(
            f"{path}: holds several GGUF models ({listed}); give the one you mean as a file"
        )
    (parts,) = models.values()
    m = SPLIT.match(parts[0].name)
    return _split_parts(path, m["base"], int(m["n"])) if m else parts


def _split_parts(folder: Path, base: str, n: int) -> list[Path]:
    parts = [folder / f"{base}-{k:05d}-of-{n:05d}.gguf" for k in range(1, n + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{folder / base}: split GGUF model of {n} parts lacks {', '.join(missing)}"
        )
    return parts
