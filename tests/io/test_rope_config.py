"""Configs saved by transformers 5 (RoPE base in ``rope_parameters``, no top-level ``rope_theta``)
run with their own RoPE base: perplexity and logits against transformers itself."""

from __future__ import annotations  # noqa: I001  (mlxmerge must precede mlx.core)

import json
import math
from pathlib import Path

import mlxmerge  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.io.rope_config import rope_fields, with_rope_fields

TEXT = "Red river, blue tree, old house. " * 6 + "The end."
THETA = 100.0  # far from mlx-lm's default 10000, so a wrong base shows in the logits


def test_rope_fields_from_flat_and_nested_parameters():
    flat = {"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}
    assert rope_fields(flat) == {"rope_theta": 1e5}
    llama3 = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0,
                                  "original_max_position_embeddings": 8192}}  # fmt: skip
    assert rope_fields(llama3) == {
        "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "llama3", "type": "llama3", "factor": 8.0,
                         "original_max_position_embeddings": 8192},
    }  # fmt: skip
    gemma3 = {"rope_parameters": {
        "full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
        "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}  # fmt: skip
    fields = rope_fields(gemma3)
    assert fields["rope_theta"] == 1e6 and fields["rope_local_base_freq"] == 1e4
    assert fields["rope_scaling"]["factor"] == 8.0
    # a top-level value is the config's own: never replaced
    assert rope_fields({**flat, "rope_theta": 3.0}) == {}
    multimodal = with_rope_fields({"model_type": "x", "text_config": flat})
    assert multimodal["text_config"]["rope_theta"] == 1e5 and "rope_theta" not in multimodal


@pytest.fixture(scope="module")
def transformers5_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny llama whose config.json is written as transformers 5 writes it."""
    from mlx.utils import tree_flatten

    from mlxmerge.demo.tiny import model_from_config, save_weights, tiny_config

    config = tiny_config(num_layers=2)
    weights = dict(tree_flatten(model_from_config(config, 0).parameters()))
    # sharper attention (q·k × 16), so the positions — and the RoPE base — matter
    weights = {k: v * 4 if ("q_proj" in k or "k_proj" in k) else v for k, v in weights.items()}
    path = save_weights(tmp_path_factory.mktemp("rope") / "t5", weights, config, tokenizer_dir)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_theta": THETA, "rope_type": "default"}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def log_probs(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    x = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return x[np.arange(len(ids) - 1), ids[1:]]


def transformers_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert model.config.rope_parameters["rope_theta"] == THETA
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_eval_perplexity_matches_transformers(transformers5_model, tmp_path):
    import mlx_lm

    from mlxmerge.eval.scoring import evaluate, load_model

    _, tok = load_model(str(transformers5_model))
    ids = tok.encode(TEXT)
    reference = math.exp(-log_probs(transformers_logits(transformers5_model, ids), ids).mean())
    (tmp_path / "text.txt").write_text(TEXT)
    report = evaluate([str(transformers5_model)], [tmp_path / "text.txt"], max_length=512)
    assert report["results"][0]["metrics"]["perplexity"] == pytest.approx(reference, rel=1e-5)
    # the check is sensitive: mlx-lm reading the file alone (base 10000) is off by far more
    plain, _ = mlx_lm.load(str(transformers5_model))
    wrong = math.exp(-log_probs(np.array(plain(mx.array([ids]))[0]), ids).mean())
    assert abs(wrong - reference) > 1e-2 * reference


def test_outputs_carry_the_base_for_mlx_lm_and_transformers(transformers5_model, tmp_path):
    """A converted model: plain mlx-lm and transformers read the same RoPE base from it."""
    import mlx_lm

    from mlxmerge.convert import convert

    out = convert(str(transformers5_model), tmp_path / "out", dtype="float32", layout="hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == THETA and cfg["rope_parameters"]["rope_theta"] == THETA
    model, tok = mlx_lm.load(str(out))
    ids = tok.encode(TEXT)
    ours = np.array(model(mx.array([ids]))[0])
    np.testing.assert_allclose(ours, transformers_logits(out, ids), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gemma3_nested", "llama3_flat"])
def test_transformers_5_reads_the_written_config_as_before(kind, tmp_path):
    """The top-level fields added for mlx-lm do not change what transformers 5 reads."""
    from transformers import AutoConfig, Gemma3TextConfig, LlamaConfig

    if kind == "gemma3_nested":
        rp = {"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
              "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}  # fmt: skip
        saved = Gemma3TextConfig(rope_parameters=rp, num_hidden_layers=2,
                                 layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    else:
        rp = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}  # fmt: skip
        saved = LlamaConfig(rope_parameters=rp)
    (tmp_path / "config.json").write_text(json.dumps(with_rope_fields(saved.to_dict())))
    read = AutoConfig.from_pretrained(str(tmp_path)).rope_parameters

    def without_type(d):  # the legacy "type" alias rides along in the scaled dict
        return {
            k: without_type(v) if isinstance(v, dict) else v for k, v in d.items() if k != "type"
        }

    assert without_type(read) == without_type(saved.rope_parameters)
