"""Mixture of experts from dense models (mergekit-moe's config) on tiny models.

References: the base model's own logits (an MoE of identical experts), the source checkpoints'
tensors, router rows recomputed in numpy from an unbatched layer-by-layer forward pass, and
transformers' forward pass for the HF layout.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

from mlxmerge.cli import cli
from mlxmerge.demo.tiny import model_from_config, save_weights, tiny_config
from mlxmerge.errors import RecipeError
from mlxmerge.merge.moe import moe, plan_moe

POS_A, POS_B, NEG_B = ["the cat", "a dog and the moon"], ["1 + 2 = 3"], ["the cat"]
TOKENS = [[1, 17, 45, 60, 8, 99, 3, 120]]


def _weights(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _logits(folder: Path) -> np.ndarray:
    import mlx_lm

    model, _ = mlx_lm.load(str(folder))
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def _torch():
    try:
        import torch
        import transformers  # noqa: F401
    except (ImportError, OSError):  # a half-installed torch raises OSError
        pytest.skip("torch/transformers not importable")
    import torch

    return torch


def _hf_logits(folder: Path) -> tuple[np.ndarray, list[str]]:
    torch = _torch()
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True
    )
    with torch.no_grad():
        out = model(torch.tensor(TOKENS)).logits.numpy()
    return out, list(info["missing_keys"]) + list(info["unexpected_keys"])


def _config(base, experts, **kw) -> dict:
    return {"base_model": str(base), "dtype": "float32", "experts": experts, **kw}


@pytest.fixture(scope="module")
def mixtral(family, tmp_path_factory):
    """A Mixtral of model_a and model_b on the Llama base, hidden gates (one with negatives)."""
    root = tmp_path_factory.mktemp("moe")
    cfg = _config(
        family["base"],
        [
            {"source_model": str(family["model_a"]), "positive_prompts": POS_A},
            {
                "source_model": str(family["model_b"]),
                "positive_prompts": POS_B,
                "negative_prompts": NEG_B,
            },
        ],
    )
    return cfg, moe(cfg, root / "mlx"), moe(cfg, root / "hf", layout="hf")


def _reference_states(model_dir: Path, prompts: list[str]) -> np.ndarray:
    """Residual entering each layer at the last token: one prompt at a time, layer by layer."""
    import mlx_lm

    model, tok = mlx_lm.load(str(model_dir))
    out = []
    for p in prompts:
        ids = tok.encode(tok.bos_token + p, add_special_tokens=False)
        h = model.model.embed_tokens(mx.array([ids]))
        rows = []
        for layer in model.model.layers:
            rows.append(np.array(h[0, -1], dtype=np.float64))
            h = layer(h, "causal" if len(ids) > 1 else None, cache=None)
        out.append(rows)
    return np.array(out)  # (prompts, layers, hidden)


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_router_rows_are_the_hidden_mode_formula(family, mixtral):
    _, out, _ = mixtral
    w = _weights(out)
    a = _reference_states(family["base"], POS_A).mean(0)
    b = _reference_states(family["base"], POS_B).mean(0) - _reference_states(
        family["base"], NEG_B
    ).mean(0)
    expected = np.stack([_unit(a), _unit(b)], axis=1)  # (layers, experts, hidden)
    for layer in range(4):
        got = w[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        np.testing.assert_allclose(got, expected[layer], atol=2e-5)


def test_experts_attention_and_embeddings_come_from_their_sources(family, mixtral):
    _, out, _ = mixtral
    w, base = _weights(out), _weights(family["base"])
    srcs = [_weights(family["model_a"]), _weights(family["model_b"])]
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    for layer in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            stacked = w[f"model.layers.{layer}.block_sparse_moe.switch_mlp.{proj}.weight"]
            for e, src in enumerate(srcs):
                np.testing.assert_array_equal(
                    stacked[e], src[f"model.layers.{layer}.mlp.{proj}.weight"]
                )
    copied = [n for n in base if ".mlp." not in n]
    assert any("self_attn" in n for n in copied) and "model.embed_tokens.weight" in copied
    for n in copied:
        np.testing.assert_array_equal(w[n], base[n])


def test_hf_layout_has_per_expert_names_and_the_same_model(family, mixtral):
    _, mlx_out, hf_out = mixtral
    w = _weights(hf_out)
    src = _weights(family["model_b"])
    np.testing.assert_array_equal(
        w["model.layers.2.block_sparse_moe.experts.1.w2.weight"],
        src["model.layers.2.mlp.down_proj.weight"],
    )
    assert not any("switch_mlp" in n for n in w)
    np.testing.assert_allclose(_logits(hf_out), _logits(mlx_out), atol=1e-5)


def test_hf_layout_loads_in_transformers_with_the_same_logits(mixtral):
    _, mlx_out, hf_out = mixtral
    hf, problems = _hf_logits(hf_out)
    assert problems == []
    np.testing.assert_allclose(hf, _logits(mlx_out), atol=1e-4)


def test_experts_all_equal_to_the_base_give_the_base_logits(family, tmp_path):
    experts = [{"source_model": str(family["base"])}] * 3
    cfg = _config(family["base"], experts, gate_mode="random", experts_per_token=2)
    with pytest.raises(RecipeError, match="every expert is"):
        plan_moe(cfg)
    out = moe(cfg, tmp_path / "same", allow_all_same=True)
    np.testing.assert_allclose(_logits(out), _logits(family["base"]), atol=1e-4)


def test_residual_scale_and_seeded_noise(family, tmp_path):
    a, b = str(family["model_a"]), str(family["model_b"])
    experts = [{"source_model": a, "residual_scale": 0.5},
               {"source_model": b, "noise_scale": 0.01}]  # fmt: skip
    cfg = _config(family["base"], experts, gate_mode="random")
    w1, w2 = (_weights(moe(cfg, tmp_path / f"n{i}", seed=3)) for i in (1, 2))
    src_a, src_b = _weights(family["model_a"]), _weights(family["model_b"])
    name = "model.layers.1.block_sparse_moe.switch_mlp.{}.weight"
    np.testing.assert_allclose(w1[name.format("down_proj")][0],
                               0.5 * src_a["model.layers.1.mlp.down_proj.weight"], rtol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(
        w1[name.format("up_proj")][0], src_a["model.layers.1.mlp.up_proj.weight"]
    )
    noise = w1[name.format("up_proj")][1] - src_b["model.layers.1.mlp.up_proj.weight"]
    assert 0.008 < noise.std() < 0.012 and abs(noise.mean()) < 0.002
    for n in w1:  # the same seed gives the same model (noise and random gates)
        np.testing.assert_array_equal(w1[n], w2[n])


def test_cheap_embed_rows_are_normalized_embedding_sums(family, tmp_path):
    from mlx_lm.utils import load_tokenizer

    experts = [
        {"source_model": str(family["model_a"]), "positive_prompts": POS_A},
        {"source_model": str(family["model_b"]), "positive_prompts": POS_B, "negative_prompts": NEG_B},
    ]  # fmt: skip
    out = moe(_config(family["base"], experts, gate_mode="cheap_embed"), tmp_path / "cheap")
    tok = load_tokenizer(family["base"])
    emb = _weights(family["base"])["model.embed_tokens.weight"].astype(np.float64)

    def summed(prompts):
        ids = [t for p in prompts for t in tok.encode(tok.bos_token + p, add_special_tokens=False)]
        return _unit(emb[ids].sum(0))

    expected = np.stack([_unit(summed(POS_A)), _unit(summed(POS_B) - summed(NEG_B))])
    w = _weights(out)
    for layer in range(4):
        np.testing.assert_allclose(
            w[f"model.layers.{layer}.block_sparse_moe.gate.weight"], expected, atol=1e-6
        )


def _qwen_family(root: Path, tokenizer: Path, model_type: str, extra: dict) -> dict[str, Path]:
    config = {**tiny_config(model_type=model_type, hidden_size=32, num_layers=2,
                            intermediate_size=64), **extra}  # fmt: skip
    paths = {}
    for seed, name in enumerate(("base", "a", "b")):
        model = model_from_config(config, seed)
        weights = dict(tree_flatten(model.parameters()))
        paths[name] = save_weights(root / name, weights, config, tokenizer, title=name)
    return paths


def test_qwen2_base_with_a_shared_expert_gives_qwen2_moe(family, tmp_path):
    q = _qwen_family(
        tmp_path, family["tokenizer"], "qwen2", {"architectures": ["Qwen2ForCausalLM"]}
    )
    experts = [
        {"source_model": str(q["a"]), "positive_prompts": POS_A},
        {"source_model": str(q["b"]), "positive_prompts": POS_B},
    ]
    shared = [{"source_model": str(q["base"]), "positive_prompts": ["the moon"]}]
    with pytest.raises(RecipeError, match="no MoE architecture for a qwen2 base with 0 shared"):
        plan_moe(_config(q["base"], experts))
    # experts_per_token = n_experts: mlx-lm's qwen2_moe does not renormalize the top-k weights
    # (transformers does), and with every expert chosen both sum to 1.
    cfg = _config(q["base"], experts, shared_experts=shared, experts_per_token=2)
    out = moe(cfg, tmp_path / "qmoe", layout="hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    w, base = _weights(out), _weights(q["base"])
    np.testing.assert_array_equal(
        w["model.layers.1.mlp.shared_expert.up_proj.weight"],
        base["model.layers.1.mlp.up_proj.weight"],
    )
    row = w["model.layers.1.mlp.shared_expert_gate.weight"]
    assert row.shape == (1, 32) and np.isclose(np.linalg.norm(row), 1.0, atol=1e-5)
    np.testing.assert_array_equal(
        w["model.layers.0.self_attn.q_proj.bias"], base["model.layers.0.self_attn.q_proj.bias"]
    )
    mlx = _logits(out)
    hf, problems = _hf_logits(out)
    assert problems == []
    np.testing.assert_allclose(hf, mlx, atol=1e-4)


def test_qwen3_base_gives_qwen3_moe_equal_to_base_when_experts_are_the_base(family, tmp_path):
    q = _qwen_family(tmp_path, family["tokenizer"], "qwen3",
                     {"architectures": ["Qwen3ForCausalLM"], "head_dim": 8})  # fmt: skip
    experts = [{"source_model": str(q["base"])}] * 2
    cfg = _config(q["base"], experts, gate_mode="uniform_random", experts_per_token=1)
    out = moe(cfg, tmp_path / "q3", allow_all_same=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"
    np.testing.assert_allclose(_logits(out), _logits(q["base"]), atol=1e-4)
    hf, problems = _hf_logits(moe(cfg, tmp_path / "q3hf", layout="hf", allow_all_same=True))
    assert problems == []
    np.testing.assert_allclose(hf, _logits(q["base"]), atol=1e-4)


def test_bad_configs_fail_before_any_work(family, tmp_path):
    a, b = str(family["model_a"]), str(family["model_b"])
    ok = [
        {"source_model": a, "positive_prompts": POS_A},
        {"source_model": b, "positive_prompts": POS_B},
    ]
    base = family["base"]
    cases = [
        (_config(base, ok, experts_per_token=3), "2 experts but experts_per_token is 3"),
        (_config(base, [ok[0], {"source_model": b}]), r"experts\[1\].*has no positive_prompts"),
        (_config(base, [ok[0], {"source_model": b, "positive_prompts": POS_A}]), "same prompts"),
        (_config(base, [ok[0], {"source_model": str(family["wide"]), "positive_prompts": POS_B}]),
         r"mlp.gate_proj.weight is \(96, 64\) in .*wide but \(128, 64\) in the base"),
        (_config(base, [ok[0], {"source_model": str(family["deep"]), "positive_prompts": POS_B}]),
         "has 6 layers, the base 4"),
        (_config(base, ok, gate_mode="hiddenx"), "unknown gate_mode 'hiddenx'"),
        (_config(base, ok, architecture="deepseek"), "no output architecture 'deepseek'"),
        (_config(base, ok, expert=1), "unknown key 'expert'"),
    ]  # fmt: skip
    for cfg, message in cases:
        with pytest.raises(RecipeError, match=message):
            moe(cfg, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_unsupported_base_type_and_other_architecture_experts(family, tmp_path):
    q = _qwen_family(tmp_path, family["tokenizer"], "qwen2", {})
    experts = [{"source_model": str(q["a"])}, {"source_model": str(q["b"])}]
    with pytest.raises(RecipeError, match="expert .* is a qwen2 model but the base .* is llama"):
        plan_moe(_config(family["base"], experts, gate_mode="random"))
    cfg = json.loads((q["base"] / "config.json").read_text())
    # a model_type with no MoE counterpart (one mlx-lm lacks: qwen2 tensors are no gemma's)
    (q["base"] / "config.json").write_text(json.dumps({**cfg, "model_type": "my_arch"}))
    with pytest.raises(RecipeError, match="no MoE architecture for a my_arch base"):
        plan_moe(_config(q["base"], experts, gate_mode="random"))


def test_cli_builds_the_model_and_reports_errors_in_one_line(family, tmp_path):
    experts = [
        {"source_model": str(family["model_a"]), "positive_prompts": POS_A},
        {"source_model": str(family["model_b"]), "positive_prompts": POS_B},
    ]
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(_config(family["base"], experts, gate_mode="cheap_embed")))
    r = CliRunner().invoke(cli, ["moe", str(path), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "mlxmerge_moe_config.yml").is_file()
    r = CliRunner().invoke(cli, ["moe", str(path), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "not empty" in r.output
    r = CliRunner().invoke(cli, ["moe", str(path), "--dry-run"])
    assert r.exit_code == 0 and "Mixtral" in r.output
