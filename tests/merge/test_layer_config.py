"""A frankenmerge writes the per-layer config fields its slices imply (Gemma 3's layer_types)."""

import json

from archs import build_arch, build_arch_tokenizer

from mlxmerge.merge.layer_config import sliced_layer_fields
from mlxmerge.merge.plan import plan_merge
from mlxmerge.merge.runner import merge

S, F = "sliding_attention", "full_attention"


def test_index_lists_follow_their_layers_and_ragged_lists_are_dropped():
    a = {"num_hidden_layers": 4, "mlp_only_layers": [0, 3], "no_rope_layers": [1, 1, 1, 0]}
    sources = [(a, 4, 3), (a, 4, 0), (a, 4, 1)]
    out, _ = sliced_layer_fields(a, sources)
    assert out["mlp_only_layers"] == [0, 1] and out["no_rope_layers"] == [0, 1, 1]
    ragged = {**a, "no_rope_layers": [1, 1]}
    out, warnings = sliced_layer_fields(ragged, [(ragged, 4, 0)])
    assert "no_rope_layers" not in out and "no_rope_layers" in warnings[0]
    assert a["mlp_only_layers"] == [0, 3]  # the source config is left as it was


def test_gemma3_frankenmerge_keeps_each_layers_attention_type(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    tok = build_arch_tokenizer(tmp_path / "tok")
    src = build_arch("gemma3_text", tmp_path / "g3", tok, layout="hf")
    types = json.loads((src / "config.json").read_text())["layer_types"]
    assert types == [S, F, S, F]
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(src), "layer_range": [0, 1]}]},
        {"sources": [{"model": str(src), "layer_range": [0, 4]}]}]}  # fmt: skip
    plan = plan_merge(recipe)
    assert any("not a period-2 pattern" in w for w in plan.warnings)  # mlx-lm reads the period
    out = merge(plan, tmp_path / "out", layout="hf")
    expected = [types[0]] + types  # layer 0 twice, then 1..3
    assert json.loads((out / "config.json").read_text())["layer_types"] == expected
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.layer_types == expected
    got = [layer.self_attn.is_sliding for layer in model.model.layers]
    assert got == [t == S for t in expected]
