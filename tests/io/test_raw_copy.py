"""Unchanged tensors are copied as bytes; the copy is exact with and without copy_file_range."""

import os

import pytest

from mlxmerge.convert import convert
from mlxmerge.io import open_checkpoint
from mlxmerge.io.writer import copy_bytes


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_bytes(tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    src = tmp_path / "src"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(b"head" + payload + b"tail")
    dst = tmp_path / "dst"
    with open(dst, "wb", buffering=0) as f:
        f.write(b"X")
        copy_bytes(src, 4, len(payload), f.fileno())
        f.write(b"Y")
    assert dst.read_bytes() == b"X" + payload + b"Y"


def test_same_dtype_convert_copies_every_tensor_byte_for_byte(tmp_path):
    from mlxmerge.demo.tiny import build_model, build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    src = build_model(tmp_path / "src", tok, seed=3, shard_size=60_000)
    out = convert(str(src), tmp_path / "out", dtype="float32", layout="hf", shard_size="100KB")
    a, b = open_checkpoint(src), open_checkpoint(out)
    for n in a.names():
        ra, rb = a.raw(n), b.raw(n)
        with open(ra.file, "rb") as fa, open(rb.file, "rb") as fb:
            fa.seek(ra.offset)
            fb.seek(rb.offset)
            assert fa.read(ra.nbytes) == fb.read(rb.nbytes), n
