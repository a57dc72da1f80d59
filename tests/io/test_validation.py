"""Every malformed checkpoint is refused before any data is read, with the file named."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from mlxmerge.errors import CheckpointError
from mlxmerge.io import open_checkpoint

# Crafted tensors a, b are no architecture's: a model_type mlx-lm lacks leaves the config check
# out of these header tests (test_architecture_check.py covers it).
CONFIG = {"model_type": "crafted", "num_hidden_layers": 1}


def good_header() -> dict:
    return {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
    }


def craft(path: Path, header, data: bytes = bytes(range(32)), *, length: int | None = None) -> Path:
    """Write a safetensors file byte by byte; ``header`` is a dict or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def model_dir(tmp_path: Path, header=None, data: bytes = bytes(range(32)), **kw) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    craft(folder / "model.safetensors", good_header() if header is None else header, data, **kw)
    return folder


def expect_error(folder: Path, fragment: str, names: str = "model.safetensors"):
    """open_checkpoint fails with ``fragment`` and a message naming ``names``."""
    with pytest.raises(CheckpointError, match=re.escape(names) + ".*" + fragment):
        open_checkpoint(folder)


def test_good_crafted_file_opens(tmp_path):
    ckpt = open_checkpoint(model_dir(tmp_path))
    assert ckpt.names() == ["a", "b"] and ckpt.shape("a") == (2, 3)
    expected = np.frombuffer(bytes(range(24)), dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(np.array(ckpt.get("a")), expected)


# -- one safetensors file ---------------------------------------------------------------


def test_file_shorter_than_the_length_field(tmp_path):
    folder = model_dir(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x05\x00\x00")
    expect_error(folder, "3 bytes, too short")


def test_truncated_data_section(tmp_path):
    folder = model_dir(tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-5])
    expect_error(folder, "tensor b lies outside the file.*truncated")


def test_header_length_past_end_of_file(tmp_path):
    expect_error(model_dir(tmp_path, length=10_000), "header length 10000 runs past the end")


def test_absurd_header_length(tmp_path):
    expect_error(model_dir(tmp_path, length=2**63), "runs past the end")


def test_header_not_json(tmp_path):
    expect_error(model_dir(tmp_path, header=b"{not json at all}"), "header is not valid JSON")


def test_header_not_utf8(tmp_path):
    expect_error(model_dir(tmp_path, header=b'{"\xff\xfe": 1}'), "header is not valid JSON")


def test_header_not_an_object(tmp_path):
    expect_error(model_dir(tmp_path, header=b"[1, 2, 3]"), "header is not a JSON object")


def test_unknown_dtype(tmp_path):
    h = good_header()
    h["a"]["dtype"] = "F12"
    expect_error(model_dir(tmp_path, h), "tensor a has unknown dtype 'F12'")


@pytest.mark.parametrize(
    "key, value",
    [("data_offsets", None), ("shape", 4), ("shape", "4"), ("shape", [True, 4]), ("shape", [4.0]),
     ("data_offsets", [24.0, 32.0]), ("data_offsets", [24]), ("dtype", ["F16"]), ("dtype", None)],
)  # fmt: skip
def test_malformed_entry(tmp_path, key, value):
    """Anything but exact ints and a dtype string; mx.load itself crashes on some of these."""
    h = good_header()
    if value is None:
        del h["b"][key]
    else:
        h["b"][key] = value
    expect_error(model_dir(tmp_path, h), "tensor b has a malformed header entry")


def test_entry_not_an_object(tmp_path):
    h = good_header()
    h["b"] = [1, 2]
    expect_error(model_dir(tmp_path, h), "tensor b has a malformed header entry")


@pytest.mark.parametrize("meta", ["x", [1], {"format": 1}])
def test_malformed_metadata(tmp_path, meta):
    h = good_header()
    h["__metadata__"] = meta
    expect_error(model_dir(tmp_path, h), "__metadata__ must map names to strings")


@pytest.mark.parametrize("dtype, size", [("F8_E4M3", 1), ("F8_E5M2", 1), ("F64", 8)])
def test_dtype_mlx_cannot_load(tmp_path, dtype, size):
    """mx.load rejects F64 and F8_E5M2 and returns F8_E4M3 as raw bytes: refuse, never misread."""
    h = good_header()
    h["b"] = {"dtype": dtype, "shape": [8 // size], "data_offsets": [24, 32]}
    ckpt = open_checkpoint(model_dir(tmp_path, h))  # the header itself is valid
    for call in (ckpt.get, ckpt.dtype):
        with pytest.raises(
            CheckpointError, match=rf"model.safetensors: tensor b is stored as {dtype}"
        ):
            call("b")


def test_negative_dimension(tmp_path):
    h = good_header()
    h["a"]["shape"] = [-2, -3]
    expect_error(model_dir(tmp_path, h), r"tensor a has a negative dimension")


def test_byte_range_does_not_match_shape_and_dtype(tmp_path):
    h = good_header()
    h["a"]["shape"] = [2, 2]  # 16 bytes, but the range holds 24
    expect_error(model_dir(tmp_path, h), r"tensor a spans 24 bytes but F32\[2, 2\] needs 16")


def test_byte_range_outside_file(tmp_path):
    h = good_header()
    h["b"]["data_offsets"] = [40, 48]
    expect_error(model_dir(tmp_path, h), r"tensor b lies outside the file \(bytes 40-48 of 32\)")
    h["b"]["data_offsets"] = [-8, 0]
    expect_error(model_dir(tmp_path, h), "tensor b lies outside the file")


def test_overlapping_ranges(tmp_path):
    h = good_header()
    h["b"]["data_offsets"] = [16, 24]
    expect_error(model_dir(tmp_path, h), "tensors a and b overlap")


def test_bytes_between_tensors(tmp_path):
    """The reference reader's rule: tensors tile the data section (a gap hides unnamed bytes)."""
    h = good_header()
    h["b"]["data_offsets"] = [28, 36]
    expect_error(
        model_dir(tmp_path, h, bytes(36)), "bytes 24-28 of the data section belong to no tensor"
    )


def test_bytes_after_the_last_tensor(tmp_path):
    expect_error(model_dir(tmp_path, data=bytes(40)), "tensors end at byte 32 of a 40-byte data")


def test_no_tensors(tmp_path):
    expect_error(
        model_dir(tmp_path, {"__metadata__": {"format": "pt"}}, b""), "holds no tensors", "model"
    )


def test_not_a_safetensors_suffix(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x" * 16)
    with pytest.raises(CheckpointError, match=r"weights\.bin: not a \.safetensors file"):
        open_checkpoint(f)


# -- the model folder and its index ------------------------------------------------------


def sharded_dir(tmp_path: Path) -> Path:
    """Two good shards and an index: a in shard 1, b in shard 2."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    h = good_header()
    craft(folder / "model-00001-of-00002.safetensors", {"a": h["a"]}, bytes(24))
    h["b"]["data_offsets"] = [0, 8]
    craft(folder / "model-00002-of-00002.safetensors", {"b": h["b"]}, bytes(8))
    write_index(
        folder, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    )
    return folder


def write_index(folder: Path, weight_map: dict) -> None:
    index = {"metadata": {"total_size": 32}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_good_sharded_folder_opens(tmp_path):
    assert open_checkpoint(sharded_dir(tmp_path)).names() == ["a", "b"]


@pytest.mark.parametrize(
    "shard", ["../model-00002-of-00002.safetensors", "sub/../../evil.safetensors"]
)
def test_index_path_climbing_out(tmp_path, shard):
    folder = sharded_dir(tmp_path)
    write_index(folder, {"a": "model-00001-of-00002.safetensors", "b": shard})
    expect_error(folder, "must be a plain relative name", "model.safetensors.index.json")


def test_index_absolute_path(tmp_path):
    folder = sharded_dir(tmp_path)
    absolute = str(folder / "model-00002-of-00002.safetensors")
    write_index(folder, {"a": "model-00001-of-00002.safetensors", "b": absolute})
    expect_error(folder, "must be a plain relative name", "model.safetensors.index.json")


def test_index_missing_shard(tmp_path):
    folder = sharded_dir(tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    expect_error(folder, "shard model-00002-of-00002.safetensors does not exist", "index.json")


def test_index_without_weight_map(tmp_path):
    folder = sharded_dir(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    expect_error(folder, "no weight_map object", "model.safetensors.index.json")


def test_index_not_json(tmp_path):
    folder = sharded_dir(tmp_path)
    (folder / "model.safetensors.index.json").write_text("{")
    expect_error(folder, "cannot parse JSON", "model.safetensors.index.json")


def test_index_lists_a_tensor_its_shard_does_not_hold(tmp_path):
    folder = sharded_dir(tmp_path)
    write_index(
        folder, {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}
    )
    # the shards swapped places in the index, so "a" is not where the index says
    message = "lists a in model-00002-of-00002.safetensors, but that shard does not hold it"
    expect_error(folder, message, "model.safetensors.index.json")


def test_symlink_shard_leading_outside(tmp_path):
    folder = sharded_dir(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(folder / "model-00002-of-00002.safetensors", outside)
    os.symlink(outside, folder / "model-00002-of-00002.safetensors")
    expect_error(folder, "is a link leading outside", "model-00002-of-00002.safetensors")


def test_symlink_weight_leading_outside_without_index(tmp_path):
    folder = model_dir(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(folder / "model.safetensors", outside)
    os.symlink(outside, folder / "model.safetensors")
    expect_error(folder, "is a link leading outside", "model.safetensors")


def test_symlink_inside_folder_is_fine(tmp_path):
    folder = sharded_dir(tmp_path)
    (folder / "blobs").mkdir()
    shutil.move(folder / "model-00002-of-00002.safetensors", folder / "blobs" / "x")
    os.symlink(folder / "blobs" / "x", folder / "model-00002-of-00002.safetensors")
    assert open_checkpoint(folder).names() == ["a", "b"]


def test_tensor_in_two_shards(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    a = {"a": good_header()["a"]}
    craft(folder / "model-00001-of-00002.safetensors", a, bytes(24))
    craft(folder / "model-00002-of-00002.safetensors", a, bytes(24))
    expect_error(folder, "tensor a is in both model-00001-of-00002.safetensors and "
                 "model-00002-of-00002.safetensors", "dup")  # fmt: skip


def test_missing_config(tmp_path):
    folder = model_dir(tmp_path)
    (folder / "config.json").unlink()
    expect_error(folder, "no config.json", "model")


def test_unparseable_config(tmp_path):
    folder = model_dir(tmp_path)
    (folder / "config.json").write_text('{"model_type": "llama",')
    expect_error(folder, "cannot parse JSON", "config.json")


def test_config_not_an_object(tmp_path):
    folder = model_dir(tmp_path)
    (folder / "config.json").write_text("[]")
    expect_error(folder, "not a JSON object", "config.json")


def test_folder_without_weights(tmp_path):
    folder = model_dir(tmp_path)
    (folder / "model.safetensors").unlink()
    expect_error(folder, "no .safetensors weights found", "model")


# -- malformed files never hang or crash ---------------------------------------------------


def test_random_corruptions_fail_cleanly(tmp_path):
    """Flip, insert, drop, truncate bytes of a good file: each opens or raises CheckpointError."""
    base = (model_dir(tmp_path) / "model.safetensors").read_bytes()
    rng = random.Random(0)
    opened = 0
    for i in range(300):
        data = bytearray(base)
        kind = i % 4
        pos = rng.randrange(len(data))
        if kind == 0:
            data[pos] = rng.randrange(256)
        elif kind == 1:
            data[pos:pos] = bytes([rng.randrange(256)])
        elif kind == 2:
            del data[pos]
        else:
            data = data[:pos]
        (tmp_path / "model" / "model.safetensors").write_bytes(bytes(data))
        try:
            ckpt = open_checkpoint(tmp_path / "model")
        except CheckpointError as e:
            assert "model" in str(e)
            continue
        opened += 1
        for n in ckpt.names():  # validated headers must be safe to load
            np.array(ckpt.get(n))
    assert 0 < opened < 300


# -- a shard set with holes ------------------------------------------------------------------


def test_shard_missing_without_index(tmp_path):
    """-of-00002 names promise two shards: one alone is an incomplete download, not a model."""
    folder = sharded_dir(tmp_path)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model-00002-of-00002.safetensors").unlink()
    expect_error(folder, "missing model-00002-of-00002.safetensors .*promise 2 shards", "sharded")


def test_index_omitting_a_shard_on_disk(tmp_path):
    folder = sharded_dir(tmp_path)
    write_index(folder, {"a": "model-00001-of-00002.safetensors"})  # b's shard left out
    expect_error(
        folder, "does not list model-00002-of-00002.safetensors", "model.safetensors.index.json"
    )
