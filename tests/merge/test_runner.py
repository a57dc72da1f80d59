"""The streaming runner end to end on tiny models: recipes, per-layer parameters, checks."""

import json

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlxmerge.cli import cli
from mlxmerge.demo.tiny import model_from_config, save_weights, tiny_config
from mlxmerge.errors import CheckpointError, RecipeError
from mlxmerge.io import open_checkpoint
from mlxmerge.merge.runner import merge, plan_merge


def weights(path) -> dict[str, np.ndarray]:
    ck = open_checkpoint(path)
    return {n: np.array(ck.get(n, mx.float32)) for n in ck.names()}


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def test_linear_is_the_weighted_average_and_loads_in_mlx_lm(family, tmp_path):
    a, b = weights(family["model_a"]), weights(family["model_b"])
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(family["model_a"]), "parameters": {"weight": 3.0}},
            {"model": str(family["model_b"]), "parameters": {"weight": 1.0}},
        ],
        "out_dtype": "float32",
    }
    out = merge(recipe, tmp_path / "lin")
    got = weights(out)
    assert set(got) == set(a)
    for n in a:
        np.testing.assert_allclose(got[n], 0.75 * a[n] + 0.25 * b[n], rtol=1e-6, atol=1e-7)
    import mlx_lm

    model, tok = mlx_lm.load(str(out))
    text = mlx_lm.generate(model, tok, prompt="the cat", max_tokens=4, verbose=False)
    assert isinstance(text, str)
    assert yaml.safe_load((out / "mlxmerge_config.yml").read_text()) == recipe
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "linear" in card and "2203.05482" in card


def test_default_output_is_bf16_mlx_layout(family, tmp_path):
    r = run("slerp", family["model_a"], family["model_b"], "--t", "0.5", "-o", tmp_path / "s")
    assert r.exit_code == 0, r.output
    ck = open_checkpoint(tmp_path / "s")
    assert {ck.dtype(n) for n in ck.names()} == {mx.bfloat16}
    assert ck.metadata["format"] == "mlx"
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True


def test_gradient_resolves_per_layer_and_outside_layers_at_t0(family, tmp_path):
    """task_arithmetic with weight gradient [0, 1]: layer i gets weight i/(L-1); embeddings, norm
    and lm_head are read at t=0 (mergekit's planner), so they take the first anchor."""
    base, a = weights(family["base"]), weights(family["model_a"])
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["model_a"]), "parameters": {"weight": [0.0, 1.0]}}],
        "out_dtype": "float32",
    }
    got = weights(merge(recipe, tmp_path / "ta"))
    for i in range(4):
        n = f"model.layers.{i}.mlp.up_proj.weight"
        np.testing.assert_allclose(
            got[n], base[n] + (i / 3) * (a[n] - base[n]), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(
        got["model.embed_tokens.weight"], base["model.embed_tokens.weight"], atol=1e-7
    )
    np.testing.assert_allclose(got["model.norm.weight"], base["model.norm.weight"], rtol=1e-6)


def test_cli_gradient_with_filters(family, tmp_path):
    base, a = weights(family["base"]), weights(family["model_a"])
    r = run("task-arithmetic", "--base", family["base"], family["model_a"],
            "--weight", "self_attn=0,1", "--weight", "0.5", "--out-dtype", "float32", "-o", tmp_path / "g")  # fmt: skip
    assert r.exit_code == 0, r.output
    got = weights(tmp_path / "g")
    n = "model.layers.3.self_attn.o_proj.weight"
    np.testing.assert_allclose(got[n], a[n], rtol=1e-5, atol=1e-6)
    n = "model.layers.3.mlp.down_proj.weight"
    np.testing.assert_allclose(got[n], base[n] + 0.5 * (a[n] - base[n]), rtol=1e-5, atol=1e-6)


def test_frankenmerge_stacks_layers(family, tmp_path):
    a, b = weights(family["model_a"]), weights(family["model_b"])
    r = run("frankenmerge", "--slice", f"{family['model_a']}:0-3", "--slice", f"{family['model_b']}:1-4",
            "--out-dtype", "float32", "-o", tmp_path / "f")  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    got = weights(tmp_path / "f")
    assert 1 + max(int(n.split(".")[2]) for n in got if n.startswith("model.layers.")) == 6
    n = "self_attn.q_proj.weight"
    np.testing.assert_array_equal(got[f"model.layers.2.{n}"], a[f"model.layers.2.{n}"])
    np.testing.assert_array_equal(got[f"model.layers.3.{n}"], b[f"model.layers.1.{n}"])
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["model.norm.weight"], b["model.norm.weight"])
    import mlx_lm

    model, _ = mlx_lm.load(str(tmp_path / "f"))
    assert len(model.layers) == 6


def test_dry_run_writes_nothing(family, tmp_path):
    r = run("ties", "--base", family["base"], family["model_a"], family["model_b"],
            "--density", "0.2", "--weight", "1", "--dry-run", "-o", tmp_path / "d")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "ties" in r.output and "estimated peak" in r.output and "density=[0.2, 0.2]" in r.output
    assert not (tmp_path / "d").exists()
    r = run(
        "ties", "--base", family["base"], family["model_a"], "--weight", "1", "--dry-run", "--json"
    )
    plan = json.loads(r.stdout)
    assert plan["output_tensors"] == len(open_checkpoint(family["base"]).names())


def test_recipe_file_round_trip(family, tmp_path):
    r = run("slerp", family["model_a"], family["model_b"], "--t", "0,0.3,1", "-o", tmp_path / "one")
    assert r.exit_code == 0, r.output
    r = run("merge", tmp_path / "one" / "mlxmerge_config.yml", tmp_path / "two")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "two" / "model.safetensors"
    ).read_bytes()


def test_stacked_experts_merge_per_expert(tmp_path, family):
    """slerp on switch_mlp (E, out, in) equals slerp applied to each expert slice."""
    from mlxmerge.merge.registry import METHODS

    cfg = tiny_config(num_layers=2) | {"model_type": "mixtral", "num_local_experts": 4,
                                      "num_experts_per_tok": 2, "architectures": ["MixtralForCausalLM"]}  # fmt: skip
    paths = []
    for seed in (1, 2):
        w = dict(tree_flatten(model_from_config(cfg, seed).parameters()))
        paths.append(
            save_weights(tmp_path / f"moe{seed}", w, cfg, family["tokenizer"], layout="mlx")
        )
    recipe = {"merge_method": "slerp", "base_model": str(paths[0]),
              "models": [{"model": str(p)} for p in paths], "parameters": {"t": 0.3}, "out_dtype": "float32"}  # fmt: skip
    got = weights(merge(recipe, tmp_path / "moe-merged"))
    n = "model.layers.1.block_sparse_moe.switch_mlp.up_proj.weight"
    x0, x1 = weights(paths[0])[n], weights(paths[1])[n]
    assert x0.ndim == 3
    slerp = METHODS["slerp"].fn
    for e in range(4):
        want = np.array(slerp([mx.array(x1[e])], mx.array(x0[e]), t=0.3))
        np.testing.assert_allclose(got[n][e], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args, match",
    [
        (["merge-kit"], None),
        (["ties", "{a}", "{b}"], "needs --base"),
        (
            ["slerp", "{a}", "{wide}", "--t", "0.5"],
            "different architectures.*intermediate_size 128 vs 96",
        ),
        (["slerp", "{a}", "{b}", "--t", "0.5", "--tt", "1"], None),
        (["frankenmerge", "--slice", "{a}:0-9"], "out of range; it has 4 layers"),
        (["slerp", "{a}", "{deep}", "--t", "0.5"], None),
        (["slerp", "{a}", "{b}"], "'t' is required"),
        (["slerp", "{a}", "/nonexistent/model", "--t", "0.5"], "no such file"),
    ],
)
def test_user_errors_are_one_line(family, tmp_path, args, match):
    names = {
        "a": family["model_a"],
        "b": family["model_b"],
        "wide": family["wide"],
        "deep": family["deep"],
    }
    args = [a.format(**names) for a in args] + ["-o", str(tmp_path / "x")]
    r = run(*args)
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    if match:
        import re

        assert re.search(match, r.output), r.output
        assert r.output.startswith("Error:") and r.output.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_unknown_method_suggests_closest(family):
    with pytest.raises(RecipeError, match="dare_ties"):
        plan_merge(
            {
                "merge_method": "dare-ties",
                "base_model": str(family["base"]),
                "models": [str(family["model_a"])],
            }
        )


def test_misspelt_parameter_lists_accepted(family):
    with pytest.raises(RecipeError, match="densty.*density"):
        plan_merge({"merge_method": "ties", "base_model": str(family["base"]),
                    "models": [{"model": str(family["model_a"]), "parameters": {"weight": 1, "densty": 0.5}}]})  # fmt: skip


def test_allow_crimes_then_names_the_mismatched_tensor(family):
    with pytest.raises(RecipeError, match=r"mlp\.(down|gate|up)_proj\.weight has different shapes"):
        plan_merge({"merge_method": "slerp", "base_model": str(family["model_a"]), "parameters": {"t": 0.5},
                    "models": [str(family["model_a"]), str(family["wide"])]}, allow_crimes=True)  # fmt: skip


def test_different_base_is_warned(family, tmp_path, caplog):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
              "models": [{"model": str(family["stranger"]), "parameters": {"weight": 1.0}}]}  # fmt: skip
    merge(recipe, tmp_path / "w")
    assert any("really fine-tuned from" in r.message for r in caplog.records)


def test_vocab_mismatch_is_refused_or_built_for_the_tokenizer(family, tmp_path):
    """Cropping 512 rows to 500 would leave the copied 512-token tokenizer with 12 ids past the
    last row (NaN logits): refused. With ``tokenizer_source: base`` every token gets a row, and
    the 12 tokens the small model lacks take the base's row (mergekit's rule)."""
    from mlxmerge.demo.tiny import build_model

    small = build_model(tmp_path / "small", family["tokenizer"], seed=0, vocab_size=500)
    recipe = {"merge_method": "linear", "models": [{"model": str(family["base"]), "parameters": {"weight": 1}},
                                                   {"model": str(small), "parameters": {"weight": 1}}]}  # fmt: skip
    with pytest.raises(RecipeError, match="500 rows .* 512 tokens.*tokenizer_source"):
        merge(recipe, tmp_path / "v", out_dtype="float32")
    out = merge({**recipe, "tokenizer_source": "base"}, tmp_path / "v", out_dtype="float32")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 512
    got = weights(out)["model.embed_tokens.weight"]
    base, sm = (
        weights(family["base"])["model.embed_tokens.weight"],
        weights(small)["model.embed_tokens.weight"],
    )
    np.testing.assert_allclose(got[500:], base[500:], rtol=1e-6)
    np.testing.assert_allclose(got[:500], (base[:500] + sm) / 2, rtol=1e-5, atol=1e-7)


def test_missing_input_leaves_no_output(family, tmp_path):
    with pytest.raises(CheckpointError):
        merge(
            {"merge_method": "linear", "models": [str(family["base"]), str(tmp_path / "none")]},
            tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.partial")]


def test_a_model_listed_twice_gets_two_independent_dare_masks(family, tmp_path):
    base, a = str(family["base"]), str(family["model_a"])
    recipe = {"merge_method": "dare_linear", "base_model": base, "dtype": "float32",
              "parameters": {"rescale": False},
              "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.3}}] * 2}  # fmt: skip
    out = merge(recipe, tmp_path / "o")
    name = "model.layers.0.mlp.up_proj.weight"
    got = np.array(mx.load(str(out / "model.safetensors"))[name])
    b = np.array(mx.load(str(family["base"] / "model.safetensors"))[name].astype(mx.float32))
    x = np.array(mx.load(str(family["model_a"] / "model.safetensors"))[name].astype(mx.float32))
    both = np.isclose(got - b, 2 * (x - b), rtol=1e-5, atol=0) & (x != b)
    one = np.isclose(got - b, x - b, rtol=1e-5, atol=0) & (x != b)
    # independent masks: kept by both with p² = 0.09, by one only with 2p(1-p) = 0.42
    # (one shared mask would give 0.3 and 0)
    assert abs(both.mean() - 0.09) < 0.03 and abs(one.mean() - 0.42) < 0.05


def test_mlxmerge_config_replays_the_command_with_its_seed_and_dtype(family, tmp_path):
    args = ["dare-linear", "--base", str(family["base"]), str(family["model_a"]),
            str(family["model_b"]), "--weight", "1", "--density", "0.5", "--seed", "3",
            "--out-dtype", "float16", "-o", str(tmp_path / "first")]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    config = (tmp_path / "first" / "mlxmerge_config.yml").read_text()
    assert config.startswith("# masks drawn with seed 3")
    assert yaml.safe_load(config)["out_dtype"] == "float16"
    res = CliRunner().invoke(cli, ["merge", str(tmp_path / "first" / "mlxmerge_config.yml"),
                                   str(tmp_path / "again"), "--seed", "3"])  # fmt: skip
    assert res.exit_code == 0, res.output
    first, again = tmp_path / "first", tmp_path / "again"
    for f in sorted(first.glob("*.safetensors")):
        assert f.read_bytes() == (again / f.name).read_bytes()


def test_json_without_dry_run_is_refused(family, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(family[k]), "parameters": {"weight": 1.0}} for k in ("model_a", "model_b")]}))  # fmt: skip
    res = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / "o"), "--json"])
    assert res.exit_code == 2 and "--dry-run" in res.output
    assert not (tmp_path / "o").exists()
