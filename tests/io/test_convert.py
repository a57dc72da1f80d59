"""convert end to end: bit-exact round trips, dtype casts, (de)quantization, the output folder."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file

from mlxmerge.convert import convert
from mlxmerge.errors import CheckpointError, MlxmergeError, OutputError

SAME_DTYPE = {"llama_fp16_tied": "float16", "llama_fp32_untied": "float32",
              "qwen2_bf16_sharded": "bfloat16", "mistral_bf16_mlx": "bfloat16"}  # fmt: skip


def metadata(folder) -> set:
    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as sf:
            out.add(sf.metadata()["format"])
    return out


def bf16_round_numpy(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits, round to nearest even (finite inputs)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("name", list(SAME_DTYPE))
def test_round_trip_hf_mlx_hf_is_bit_exact(zoo, st, tmp_path, name):
    src = zoo[name]
    dtype = SAME_DTYPE[name]
    mlx_out = convert(src, tmp_path / "mlx", dtype=dtype, layout="mlx")
    hf_out = convert(mlx_out, tmp_path / "hf", dtype=dtype, layout="hf")
    assert metadata(mlx_out) == {"mlx"} and metadata(hf_out) == {"pt"}
    before = st.raw_tensors(src)
    assert st.raw_tensors(mlx_out) == before
    assert st.raw_tensors(hf_out) == before
    if dtype != "bfloat16":  # numpy reads fp16/fp32; bf16 was compared as raw bytes above
        ref = load_file(str(next(src.glob("*.safetensors"))))
        got = load_file(str(hf_out / "model.safetensors"))
        for k, v in ref.items():
            np.testing.assert_array_equal(got[k], v)


def test_fp32_to_bf16_and_fp16_round_like_numpy(zoo, st, tmp_path, llama_fp32):
    src = st.raw_tensors(llama_fp32)
    f32 = {k: st.to_numpy(*v) for k, v in src.items()}
    bf = st.raw_tensors(convert(llama_fp32, tmp_path / "bf", dtype="bf16"))
    half = load_file(
        str(convert(llama_fp32, tmp_path / "half", dtype="fp16") / "model.safetensors")
    )
    for k, x in f32.items():
        assert bf[k][0] == "BF16"
        np.testing.assert_array_equal(
            np.frombuffer(bf[k][2], "<u2").reshape(x.shape), bf16_round_numpy(x)
        )
        np.testing.assert_array_equal(half[k], x.astype(np.float16))
    config = json.loads((tmp_path / "half" / "config.json").read_text())
    assert config["torch_dtype"] == "float16"


def test_quantize_matches_mlx_and_its_error_bound(st, tmp_path, llama_fp32):
    out = convert(llama_fp32, tmp_path / "q4", dtype="float32", quantize_bits=4, group_size=32)
    original = st.float_tensors(llama_fp32)
    raw = st.raw_tensors(out)
    deq = st.float_tensors(out)  # numpy unpacking of the stored triplets
    quantized = [k for k in original if k.removesuffix(".weight") + ".scales" in raw]
    assert "model.embed_tokens.weight" in quantized and "lm_head.weight" in quantized
    assert len(quantized) == 2 + 4 * 7  # embeddings, head, and 7 linears per layer
    for k in quantized:
        w = original[k]
        ref = mx.dequantize(*mx.quantize(mx.array(w), group_size=32, bits=4), group_size=32, bits=4)
        np.testing.assert_allclose(deq[k], np.array(ref), rtol=1e-6, atol=1e-7, err_msg=k)
        # Independent bound: one quantization step of the group, (max - min) / 15. Plain
        # rounding gives step/2; MLX rescales so the group's edge is exact, and the far end
        # may then clip by up to 15/16 of a step.
        groups = w.reshape(w.shape[0], -1, 32)
        step = (groups.max(-1, keepdims=True) - groups.min(-1, keepdims=True)) / 15
        err = np.abs(deq[k] - w).reshape(groups.shape)
        assert np.all(err <= step * (1 + 1e-4) + 1e-7), k
        assert err.mean() <= 0.3 * step.mean(), k  # uniform rounding error averages step/4
    for k in set(original) - set(quantized):  # norms stay exact
        np.testing.assert_array_equal(deq[k], original[k])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["tie_word_embeddings"] is False
    assert metadata(out) == {"mlx"}


def test_dequantize_an_mlx_quantized_model(zoo, st, tmp_path):
    src = zoo["llama_q4_mlx"]
    out = convert(src, tmp_path / "deq", dtype="float32", layout="hf")
    expected = st.float_tensors(src)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(expected)  # no .scales / .biases left
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert config["torch_dtype"] == "float32" and config["tie_word_embeddings"] is True
    assert metadata(out) == {"pt"}


@pytest.mark.parametrize("name", ["llama_fp16_tied", "llama_fp32_untied"])
def test_output_folder_contents(zoo, tmp_path, name):
    src = zoo[name]
    out = convert(src, tmp_path / "out", dtype="bfloat16", layout="mlx")
    config = json.loads((out / "config.json").read_text())
    tensors = st_names(out)
    assert config["torch_dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] == ("lm_head.weight" not in tensors)
    assert "quantization" not in config
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    template = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" in template
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "mlx" and "mlxmerge" in front["tags"]
    assert "mlxmerge convert" in text


def st_names(folder) -> set[str]:
    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as sf:
            names.update(sf.keys())
    return names


def test_sharded_output_and_index(st, tmp_path, llama_fp32):
    out = convert(llama_fp32, tmp_path / "sh", dtype="float32", layout="hf", shard_size="60KB")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n >= 3
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) for f in files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    raw = st.raw_tensors(out)
    assert set(index["weight_map"]) == set(raw) == set(st.raw_tensors(llama_fp32))
    assert index["metadata"]["total_size"] == sum(len(v[2]) for v in raw.values())
    for name, fname in index["weight_map"].items():
        assert name in st.raw_header(out / fname)[0]
    for f in files:  # no shard over the limit unless it holds a single larger tensor
        header, _ = st.raw_header(out / f)
        sizes = [
            v["data_offsets"][1] - v["data_offsets"][0]
            for k, v in header.items()
            if k != "__metadata__"
        ]
        assert sum(sizes) <= 60_000 or len(sizes) == 1
    assert st.raw_tensors(out) == st.raw_tensors(llama_fp32)


def test_converted_models_give_the_same_logits(zoo, tmp_path, llama_fp32):
    import mlx_lm

    tokens = mx.array([[1, 17, 42, 7, 300]])
    ref = mlx_lm.load(str(llama_fp32))[0](tokens)
    sharded = convert(llama_fp32, tmp_path / "sh", dtype="float32", shard_size="60KB")
    np.testing.assert_array_equal(np.array(mlx_lm.load(str(sharded))[0](tokens)), np.array(ref))
    q = convert(llama_fp32, tmp_path / "q8", dtype="float32", quantize_bits=8, group_size=32)
    model, tokenizer = mlx_lm.load(str(q))
    out = model(tokens)
    assert model.model.layers[0].mlp.up_proj.__class__.__name__ == "QuantizedLinear"
    # 8-bit weights: the logits move, but little next to their spread
    assert float(mx.abs(out - ref).max()) < 0.1 * float(ref.std())
    assert isinstance(mlx_lm.generate(model, tokenizer, "the cat", max_tokens=3), str)


def test_convert_user_errors(tmp_path, llama_fp32):
    with pytest.raises(MlxmergeError, match="unknown dtype 'int8'"):
        convert(llama_fp32, tmp_path / "a", dtype="int8")
    with pytest.raises(MlxmergeError, match="quantized output needs --format mlx"):
        convert(llama_fp32, tmp_path / "b", quantize_bits=4, layout="hf")
    with pytest.raises(OutputError, match="sit inside the input"):
        convert(llama_fp32, llama_fp32 / "out")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        convert(tmp_path / "absent", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
