"""HF layout splits mlx-lm's stacked MoE experts back into one tensor per expert."""

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten

from mlxmerge.convert import convert
from mlxmerge.demo.tiny import build_tokenizer, model_from_config, save_weights, tiny_config
from mlxmerge.io import open_checkpoint


def test_stacked_experts_round_trip_through_hf_layout(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    cfg = tiny_config(num_layers=2) | {"model_type": "mixtral", "num_local_experts": 4,
                                      "num_experts_per_tok": 2, "architectures": ["MixtralForCausalLM"]}  # fmt: skip
    weights = dict(tree_flatten(model_from_config(cfg, 0).parameters()))
    mlx_dir = save_weights(tmp_path / "mlx", weights, cfg, tok, layout="mlx")
    hf = convert(str(mlx_dir), tmp_path / "hf", dtype="float32", layout="hf")
    ck = open_checkpoint(hf)
    assert not [n for n in ck.entries if "switch_mlp" in n]  # stored names, not the MLX view
    stacked = weights["model.layers.1.block_sparse_moe.switch_mlp.gate_proj.weight"]
    for e in range(4):
        got = np.array(ck.get(f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"))
        np.testing.assert_array_equal(got, np.array(stacked[e]))
    # mlx-lm stacks them again on load: same logits as the original
    tokens = mx.array([[1, 5, 9, 12, 40]])
    m0, _ = mlx_lm.load(str(mlx_dir))
    m1, _ = mlx_lm.load(str(hf))
    np.testing.assert_allclose(np.array(m1(tokens)), np.array(m0(tokens)), rtol=1e-5, atol=1e-5)


# -- names shared by both layouts, and layer renumbering ---------------------------------------


def test_renumber_layer_every_scheme():
    from mlxmerge.io.layout import renumber_layer

    for name, want in [
        ("model.layers.3.mlp.up_proj.weight", "model.layers.7.mlp.up_proj.weight"),
        ("model.h.3.attn.c_attn.weight", "model.h.7.attn.c_attn.weight"),
        ("h.3.attn.c_attn.bias", "h.7.attn.c_attn.bias"),  # GPT-2 HF names: no prefix
        ("transformer.blocks.3.ffn.weight", "transformer.blocks.7.ffn.weight"),
        # only the decoder index moves, not an expert index inside the layer
        ("model.layers.3.mlp.experts.3.w1.weight", "model.layers.7.mlp.experts.3.w1.weight"),
    ]:
        assert renumber_layer(name, 7) == want


def test_input_embeddings_are_those_of_the_first_slice():
    from mlxmerge.io.layout import is_input_embedding

    assert is_input_embedding("model.embed_tokens.weight")
    assert is_input_embedding("model.wte.weight") and is_input_embedding("model.wpe.weight")
    assert not is_input_embedding("lm_head.weight")
    assert not is_input_embedding("model.norm.weight") and not is_input_embedding("model.ln_f.bias")


def test_hf_names_map_to_mlx_names_and_back():
    from mlxmerge.io.layout import hf_to_mlx, mlx_to_hf

    hf = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": (8, 4) for e in range(3)
          for w in ("w1", "w2", "w3")}  # fmt: skip
    hf["model.embed_tokens.weight"] = (10, 4)
    view = hf_to_mlx(hf, "mixtral")
    d = view["model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight"]
    assert d.op == "stack" and d.shape == (3, 8, 4)
    assert d.sources == tuple(
        f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight" for e in range(3)
    )
    back = mlx_to_hf([(k, v.shape) for k, v in view.items()], "mixtral")
    assert sorted(n for n, _ in back) == sorted(hf)


def test_incomplete_experts_are_refused():
    import pytest

    from mlxmerge.errors import CheckpointError
    from mlxmerge.io.layout import hf_to_mlx

    hf = {f"model.layers.2.mlp.experts.{e}.up_proj.weight": (8, 4) for e in (0, 1, 3)}
    with pytest.raises(CheckpointError, match=r"model.layers.2: experts \[2\] of up_proj.weight"):
        hf_to_mlx(hf, "qwen3_moe")


def test_frankenmerge_refuses_unknown_layer_naming(tmp_path):
    import json

    import pytest
    from safetensors.numpy import load_file, save_file

    from mlxmerge.errors import RecipeError
    from mlxmerge.merge.plan import plan_merge

    tok = build_tokenizer(tmp_path / "tok")
    cfg = tiny_config(num_layers=2)
    src = save_weights(tmp_path / "m", dict(tree_flatten(model_from_config(cfg, 0).parameters())),
                       cfg, tok)  # fmt: skip
    odd = tmp_path / "odd"
    odd.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k.replace(".layers.", ".stack."): v for k, v in tensors.items()},
              str(odd / "model.safetensors"))  # fmt: skip
    # an architecture mlx-lm lacks (as a llama, its tensors would be refused when opened)
    (odd / "config.json").write_text(json.dumps({**cfg, "model_type": "stacked_llama"}))
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": str(odd), "layer_range": [0, 1]}]}]}  # fmt: skip
    with pytest.raises(
        RecipeError, match="names its decoder layers in a way mlxmerge cannot slice"
    ):
        plan_merge(recipe)


def test_gpt2_hub_names_map_to_mlx_names():
    from mlxmerge.io.layout import hf_to_mlx

    hf = {"transformer.h.0.attn.c_attn.weight": (8, 24), "transformer.h.0.attn.bias": (1, 1, 4, 4),
          "h.1.attn.masked_bias": (), "transformer.wte.weight": (10, 8)}  # fmt: skip
    view = hf_to_mlx(hf, "gpt2")
    assert sorted(view) == ["model.h.0.attn.c_attn.weight", "model.wte.weight"]  # buffers dropped
    d = view["model.h.0.attn.c_attn.weight"]
    assert (d.op, d.shape) == ("transpose", (24, 8))  # Conv1D (in, out) → Linear (out, in)
