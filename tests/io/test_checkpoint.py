"""open_checkpoint on every fixture kind, checked against an independent reader and mlx-lm."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from mlxmerge.errors import CheckpointError
from mlxmerge.io import layer_index, open_checkpoint
from mlxmerge.io.checkpoint import natural_key
from mlxmerge.io.hub import split_revision


def test_fixture_loads_and_generates_with_mlx_lm(zoo, model_name):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(zoo[model_name]))
    text = mlx_lm.generate(model, tokenizer, "the cat", max_tokens=4)
    assert isinstance(text, str)
    logits = model(mx.array([[1, 5, 9]]))
    assert logits.shape == (1, 3, 512)
    assert bool(mx.all(mx.isfinite(logits)))


def test_names_shapes_dtypes_match_safetensors_library(zoo, zoo_kwargs, model_name):
    ckpt = open_checkpoint(zoo[model_name])
    stored = {}
    for f in sorted(zoo[model_name].glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as sf:
            for k in sf.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
                stored[k] = sf.get_slice(k)
    quantized = "quantize" in zoo_kwargs[model_name]
    logical = {k for k in stored if not (quantized and k.endswith((".scales", ".biases")))}
    assert set(ckpt.names()) == logical
    for n in ckpt.names():
        shape = tuple(stored[n].get_shape())
        if ckpt.is_quantized(n):
            shape = shape[:-1] + (shape[-1] * 32 // 4,)
        assert ckpt.shape(n) == shape, n
        assert ckpt.numel(n) == math.prod(shape)


def test_get_returns_the_stored_values(zoo, model_name, st):
    ckpt = open_checkpoint(zoo[model_name])
    expected = st.float_tensors(zoo[model_name])
    assert set(expected) == set(ckpt.names())
    for n, ref in expected.items():
        got = np.array(ckpt.get(n, mx.float32))
        if ckpt.is_quantized(n):
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6, err_msg=n)
        else:
            np.testing.assert_array_equal(got, ref.astype(np.float32), err_msg=n)


def test_dtype_reports_storage_dtype(zoo):
    assert open_checkpoint(zoo["llama_fp16_tied"]).dtype("model.norm.weight") == mx.float16
    assert open_checkpoint(zoo["qwen2_bf16_sharded"]).dtype("model.norm.weight") == mx.bfloat16
    q = open_checkpoint(zoo["llama_q4_mlx"])
    w = "model.layers.0.mlp.up_proj.weight"
    assert q.is_quantized(w) and q.dtype(w) == mx.float32 and q.shape(w) == (128, 64)
    assert q.quant_params(w) == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert not q.is_quantized("model.norm.weight")
    assert "model.layers.0.mlp.up_proj.scales" not in q


def test_config_and_tying(zoo, zoo_kwargs, model_name):
    ckpt = open_checkpoint(zoo[model_name])
    config = json.loads((zoo[model_name] / "config.json").read_text())
    assert ckpt.config == config
    assert ckpt.model_type == zoo_kwargs[model_name]["model_type"]
    assert (
        ckpt.num_layers
        == 4
        == 1 + max(layer_index(n) for n in ckpt.names() if layer_index(n) is not None)
    )
    has_head = "lm_head.weight" in ckpt
    assert ckpt.tie_word_embeddings == (not has_head) == zoo_kwargs[model_name]["tie"]
    assert ckpt.size_on_disk == sum(f.stat().st_size for f in zoo[model_name].glob("*.safetensors"))


def test_sharded_fixture_has_at_least_three_shards(zoo):
    folder = zoo["qwen2_bf16_sharded"]
    ckpt = open_checkpoint(folder)
    assert len(ckpt.files) >= 3
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ckpt.names())
    assert {ckpt.entries[n].file.name for n in ckpt.names()} == set(index["weight_map"].values())


def test_single_file_reference(zoo, st):
    f = zoo["llama_fp16_tied"] / "model.safetensors"
    ckpt = open_checkpoint(f)
    assert ckpt.path == zoo["llama_fp16_tied"] and ckpt.model_type == "llama"
    assert ckpt.metadata == {"format": "pt"}
    n = "model.layers.2.self_attn.q_proj.weight"
    np.testing.assert_array_equal(np.array(ckpt.get(n)), st.float_tensors(f.parent)[n])


def test_get_unknown_tensor(zoo):
    with pytest.raises(CheckpointError, match="no tensor named model.nope.weight"):
        open_checkpoint(zoo["llama_fp16_tied"]).get("model.nope.weight")


def test_names_sort_layers_numerically(zoo):
    names = open_checkpoint(zoo["llama_fp32_untied"]).names()
    layers = [layer_index(n) for n in names if layer_index(n) is not None]
    assert layers == sorted(layers)
    assert sorted(["layers.10.w", "layers.2.w", "layers.1.w"], key=natural_key) == [
        "layers.1.w", "layers.2.w", "layers.10.w"
    ]  # fmt: skip


def test_layer_index():
    assert layer_index("model.layers.17.mlp.up_proj.weight") == 17
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("model.layers.weight") is None


# -- hub references, offline ------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads these once at import; mlx-lm has imported it already.
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


@pytest.mark.parametrize("ref", ["some-org/some-model", "some-org/some-model@v1.0"])
def test_uncached_hub_reference_offline(offline_hub, ref):
    with pytest.raises(CheckpointError, match=rf"{ref}: not a local path.*HF_HUB_OFFLINE"):
        open_checkpoint(ref)


def test_missing_local_path_is_not_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        open_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        open_checkpoint("./org/name")


def test_split_revision(tmp_path):
    assert split_revision("org/name@rev") == ("org/name", "rev")
    assert split_revision("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert split_revision("org/name") == ("org/name", None)
    assert split_revision("org/name@") == ("org/name", None)
    local = tmp_path / "a@b"
    local.mkdir()
    assert split_revision(str(local)) == (str(local), None)  # an existing path is never split


def test_adapter_and_sae_folders_given_as_models_say_what_they_are(tmp_path):
    from safetensors.numpy import save_file

    adapter, sae, other = tmp_path / "adapter", tmp_path / "sae", tmp_path / "other"
    for folder, files in ((adapter, ("adapter_config.json", "adapters.safetensors")),
                          (sae, ("cfg.json", "sae_weights.safetensors")),
                          (other, ("x.safetensors",))):  # fmt: skip
        folder.mkdir()
        for f in files:
            if f.endswith(".json"):
                (folder / f).write_text("{}")
            else:
                save_file({"w": np.zeros(2, np.float32)}, str(folder / f))
    with pytest.raises(CheckpointError, match=r"it is a LoRA adapter.*BASE\+.*adapter"):
        open_checkpoint(adapter)
    with pytest.raises(CheckpointError, match="it is an SAE folder"):
        open_checkpoint(sae)
    with pytest.raises(CheckpointError, match="no config.json; is this a model folder"):
        open_checkpoint(other)
