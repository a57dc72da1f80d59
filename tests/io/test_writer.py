"""The streaming shard writer and write_model: order, completeness, atomicity, refusals."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file

from mlxmerge.errors import MlxmergeError, OutputError
from mlxmerge.io import ModelCard, Quantization, ShardedWriter, TensorSpec, parse_size, write_model
from mlxmerge.io.writer import plan_shards

SHAPES = {"a.weight": (8, 16), "b.weight": (32,), "c.weight": (4, 4, 4), "d.bias": (3,)}


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def specs(dtype=mx.float32) -> list[TensorSpec]:
    return [TensorSpec(n, s, dtype) for n, s in SHAPES.items()]


def leftovers(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# -- ShardedWriter ----------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [10**9, 600, 1])
def test_writer_output_read_by_safetensors(tmp_path, shard_size):
    data = arrays()
    with ShardedWriter(tmp_path, specs(), shard_size=shard_size, metadata={"format": "pt"}) as w:
        for n, x in data.items():
            w.write(n, mx.array(x))
    files = sorted(tmp_path.glob("*.safetensors"))
    got = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as sf:
            assert sf.metadata() == {"format": "pt"}
        got.update(load_file(str(f)))
    assert set(got) == set(data)
    for n in data:
        np.testing.assert_array_equal(got[n], data[n])
    if shard_size == 1:  # every tensor alone in its shard
        assert [f.name for f in files] == [
            f"model-{i:05d}-of-00004.safetensors" for i in (1, 2, 3, 4)
        ]
    if len(files) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(data)
        assert index["metadata"]["total_size"] == sum(x.nbytes for x in data.values())
        for n, fname in index["weight_map"].items():
            assert n in load_file(str(tmp_path / fname))
    else:
        assert [f.name for f in files] == ["model.safetensors"]


def test_writer_slices_large_tensors_and_writes_empty_ones(tmp_path, monkeypatch):
    from mlxmerge.io import writer

    monkeypatch.setattr(writer, "WRITE_CHUNK", 7)  # slices that split elements
    data = {**arrays(), "e.weight": np.zeros((0, 4), np.float32)}
    sp = [*specs(mx.float16), TensorSpec("e.weight", (0, 4), mx.float16)]
    with ShardedWriter(tmp_path, sp) as w:
        for n, x in data.items():
            w.write(n, mx.array(x))
    got = load_file(str(tmp_path / "model.safetensors"))
    for n, x in data.items():
        assert got[n].shape == x.shape
        np.testing.assert_array_equal(got[n], x.astype(np.float16))


def test_writer_casts_to_planned_dtype(tmp_path):
    data = arrays()
    with ShardedWriter(tmp_path, specs(mx.float16)) as w:
        for n, x in data.items():
            w.write(n, mx.array(x))
    got = load_file(str(tmp_path / "model.safetensors"))
    for n, x in data.items():
        assert got[n].dtype == np.float16
        np.testing.assert_array_equal(got[n], x.astype(np.float16))


def test_writer_enforces_order_shape_and_count(tmp_path):
    data = arrays()
    w = ShardedWriter(tmp_path, specs())
    with pytest.raises(ValueError, match="expected tensor a.weight next, got b.weight"):
        w.write("b.weight", mx.array(data["b.weight"]))
    with pytest.raises(ValueError, match=r"a.weight: planned shape \(8, 16\), got \(16, 8\)"):
        w.write("a.weight", mx.array(data["a.weight"].T))
    for n, x in data.items():
        w.write(n, mx.array(x))
    with pytest.raises(ValueError, match="every planned tensor was already written"):
        w.write("e.weight", mx.zeros((1,)))
    w.close()  # complete despite the refused writes
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(data)


def test_writer_incomplete_output_raises(tmp_path):
    data = arrays()
    w = ShardedWriter(tmp_path, specs())
    w.write("a.weight", mx.array(data["a.weight"]))
    w.write("b.weight", mx.array(data["b.weight"]))
    with pytest.raises(ValueError, match="output incomplete: tensor c.weight was never written"):
        w.close()


def test_writer_rejects_duplicate_names(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        ShardedWriter(tmp_path, specs() + specs())


def test_plan_shards_respects_the_size():
    sizes = [5, 3, 8, 1, 1, 12, 2]
    sp = [TensorSpec(f"t{i}", (n,), mx.uint8) for i, n in enumerate(sizes)]
    shards = plan_shards(sp, 8)
    assert [s.name for shard in shards for s in shard] == [s.name for s in sp]  # order kept
    for shard in shards:
        assert sum(s.nbytes for s in shard) <= 8 or len(shard) == 1
    assert [[s.nbytes for s in shard] for shard in shards] == [[5, 3], [8], [1, 1], [12], [2]]


@pytest.mark.parametrize(
    "text, expected",
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("1.5G", 15 * 10**8), ("2GiB", 2 * 2**30),
     ("64KiB", 65536), ("1000", 1000), (123, 123), (" 10 mb ", 10**7)],
)  # fmt: skip
def test_parse_size(text, expected):
    assert parse_size(text) == expected


# -- write_model -------------------------------------------------------------------------------


def write(target, data, *, compute=None, **kw):
    plan = [(n, x.shape) for n, x in data.items()]
    kw.setdefault("dtype", mx.float32)
    return write_model(
        target, plan, compute or (lambda n: mx.array(data[n])), config={"model_type": "x"},
        tokenizer_source=None, card=ModelCard("t", body="made in a test"), **kw,
    )  # fmt: skip


def test_write_model_keyboard_interrupt_leaves_nothing(tmp_path):
    data = arrays()

    def compute(name):
        if name == "c.weight":
            raise KeyboardInterrupt
        return mx.array(data[name])

    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "out", data, compute=compute)
    assert list(tmp_path.iterdir()) == []


def test_write_model_interrupt_keeps_the_old_output(tmp_path):
    data = arrays()
    write(tmp_path / "out", data)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def compute(name):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write(tmp_path / "out", data, compute=compute, force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert leftovers(tmp_path) == []


def test_write_model_refuses_non_empty_output(tmp_path):
    data = arrays()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"out: folder exists and is not empty \(use --force"):
        write(out, data)
    assert (out / "keep.txt").read_text() == "mine"
    write(out, data, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_write_model_into_empty_existing_folder(tmp_path):
    (tmp_path / "out").mkdir()
    write(tmp_path / "out", arrays())
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_write_model_refuses_a_file_as_output(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="out: exists and is not a folder"):
        write(tmp_path / "out", arrays())


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_write_model_refuses_output_at_an_input(tmp_path, where):
    model = tmp_path / "models" / "in"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    target = {"same": model, "inside": model / "sub", "parent": tmp_path / "models"}[where]
    with pytest.raises(OutputError, match="output would overwrite or sit inside the input"):
        write(target, arrays(), inputs=[str(model)], force=True)
    assert (model / "config.json").read_text() == "{}"


def test_write_model_checks_computed_shape(tmp_path):
    data = arrays()
    with pytest.raises(MlxmergeError, match=r"b.weight: computed shape \(2,\), planned \(32,\)"):
        write(
            tmp_path / "out",
            data,
            compute=lambda n: mx.zeros((2,)) if n == "b.weight" else mx.array(data[n]),
        )
    assert list(tmp_path.iterdir()) == []


def test_write_model_bad_layout_and_quantized_hf(tmp_path):
    with pytest.raises(MlxmergeError, match="unknown layout 'onnx'"):
        write(tmp_path / "out", arrays(), layout="onnx")
    with pytest.raises(MlxmergeError, match="quantized output needs --format mlx"):
        write(tmp_path / "out", arrays(), layout="hf", quantize=Quantization(4, 32))
    assert list(tmp_path.iterdir()) == []


def test_write_model_card_config_and_metadata(tmp_path, tokenizer_dir):
    data = {"model.embed_tokens.weight": np.ones((8, 64), np.float32),
            "lm_head.weight": np.ones((8, 64), np.float32)}  # fmt: skip
    config = {"model_type": "llama", "tie_word_embeddings": True, "quantization_config": {"x": 1}}
    out = write_model(
        tmp_path / "out", [(n, x.shape) for n, x in data.items()], lambda n: mx.array(data[n]),
        config=config,
        tokenizer_source=tokenizer_dir, dtype=mx.bfloat16, layout="hf",
        card=ModelCard("My model", body="Body text.", base_models=["org/base"]),
        extra_files={"notes.txt": "hello"},
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is False  # lm_head.weight was written
    assert "quantization" not in config and "quantization_config" not in config
    with safe_open(str(out / "model.safetensors"), framework="numpy") as sf:
        assert sf.metadata() == {"format": "pt"}
    text = (out / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    assert yaml.safe_load(front) == {"base_model": ["org/base"], "library_name": "transformers",
                                     "tags": ["mlxmerge"]}  # fmt: skip
    assert "# My model" in body and "Body text." in body
    assert (out / "notes.txt").read_text() == "hello"
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).read_bytes() == (tokenizer_dir / f).read_bytes()


def test_write_model_quantized_specs_and_config(tmp_path):
    rng = np.random.default_rng(1)
    data = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 64)).astype(np.float32),
            "model.norm.weight": np.ones(64, np.float32),
            "model.layers.0.odd.weight": np.ones((4, 48), np.float32)}  # fmt: skip
    out = write(tmp_path / "out", data, quantize=Quantization(8, 32), dtype=mx.float16)
    got = load_file(str(out / "model.safetensors"))
    w = "model.layers.0.mlp.up_proj"
    assert got[f"{w}.weight"].dtype == np.uint32 and got[f"{w}.weight"].shape == (16, 64 * 8 // 32)
    assert got[f"{w}.scales"].shape == got[f"{w}.biases"].shape == (16, 2)
    assert got[f"{w}.scales"].dtype == np.float16
    assert got["model.norm.weight"].dtype == np.float16  # 1-D: stays float
    assert got["model.layers.0.odd.weight"].shape == (4, 48)  # 48 % 32 != 0: stays float
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert config["torch_dtype"] == "float16"
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in got.values())
    assert (out / "model.safetensors").stat().st_size > total


def test_write_model_progress_callback(tmp_path):
    seen = []
    write(tmp_path / "out", arrays(), progress=seen.append)
    assert seen == list(SHAPES)
