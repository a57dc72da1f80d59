"""``base+adapter`` merge inputs: fused per tensor as read, against numpy and mlx-lm's own fuse."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from mlxmerge.cli import cli
from mlxmerge.convert import convert
from mlxmerge.errors import CheckpointError, MlxmergeError
from mlxmerge.io import open_checkpoint
from mlxmerge.merge.runner import merge

KEYS = ["self_attn.q_proj", "mlp.down_proj"]


def mlx_lm_adapter(model_path, folder, *, seed: int, scale: float = 2.0, num_layers: int = 2):
    """An adapter made by mlx-lm's own LoRA layers (random B), and mlx-lm's fused weights."""
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_path))
    params = {"rank": 4, "scale": scale, "dropout": 0.0, "keys": KEYS}
    mx.random.seed(seed)
    linear_to_lora_layers(model, num_layers, params)
    fused = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
            fused[f"{name}.weight"] = m.fuse(dequantize=True).weight
    adapters = {
        k: v for k, v in tree_flatten(model.parameters()) if k.endswith(("lora_a", "lora_b"))
    }
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), adapters)
    config = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return fused


def numpy_fused(base_folder, adapter_folder, scale) -> dict[str, np.ndarray]:
    w = load_file(str(base_folder / "model.safetensors"))
    lora = load_file(str(adapter_folder / "adapters.safetensors"))
    for key in lora:
        if key.endswith(".lora_a"):
            m = key.removesuffix(".lora_a")
            w[f"{m}.weight"] = w[f"{m}.weight"] + scale * (lora[key] @ lora[f"{m}.lora_b"]).T
    return w


def test_recipe_with_an_mlx_lm_adapter_is_the_fused_model(family, tmp_path):
    base, adapter = family["base"], tmp_path / "adapter"
    by_mlx_lm = mlx_lm_adapter(base, adapter, seed=1)
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}  # fmt: skip
    out = merge(recipe, tmp_path / "out")
    got = load_file(str(out / "model.safetensors"))
    ref = numpy_fused(base, adapter, 2.0)
    assert set(got) == set(ref)
    assert len(by_mlx_lm) == 2 * 2  # two keys in the last two layers
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-6, err_msg=k)
    for k, v in by_mlx_lm.items():
        np.testing.assert_allclose(got[k], np.array(v), atol=1e-6, err_msg=k)
    assert not np.array_equal(got["model.layers.3.mlp.down_proj.weight"],
                              load_file(str(base / "model.safetensors"))["model.layers.3.mlp.down_proj.weight"])  # fmt: skip
    assert list(tmp_path.glob("**/*fused*")) == []  # nothing fused went to disk besides the output
    with pytest.raises(MlxmergeError, match="output would overwrite or sit inside the input"):
        merge(recipe, adapter / "merged")


def test_task_arithmetic_of_two_adapters_on_a_quantized_base(family, tmp_path):
    qbase = convert(
        family["base"], tmp_path / "q4", dtype="float32", quantize_bits=4, group_size=32
    )
    fused_a = mlx_lm_adapter(qbase, tmp_path / "a", seed=2, scale=1.5)
    fused_b = mlx_lm_adapter(qbase, tmp_path / "b", seed=3, scale=0.5, num_layers=4)
    res = CliRunner().invoke(cli, ["task-arithmetic", "--base", str(qbase), f"{qbase}+{tmp_path / 'a'}",
                                   f"{qbase}+{tmp_path / 'b'}", "--weight", "1", "--out-dtype", "float32",
                                   "-o", str(tmp_path / "ta")])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = load_file(str(tmp_path / "ta" / "model.safetensors"))
    ck = open_checkpoint(qbase)
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.0.mlp.up_proj.weight"):  # fmt: skip
        w = np.array(ck.get(name, mx.float32))  # the dequantized base
        ref = w + sum(np.array(f[name]) - w for f in (fused_a, fused_b) if name in f)
        np.testing.assert_allclose(got[name], ref, atol=1e-5, err_msg=name)


def test_inspect_describes_adapters_and_bad_references(family, tmp_path):
    mlx_lm_adapter(family["base"], tmp_path / "a", seed=4)
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "a"), "--json"])
    info = json.loads(res.stdout)
    assert info["kind"] == "adapter" and info["format"] == "mlx"
    assert (
        info["modules"] == ["down_proj", "q_proj"]
        and info["ranks"] == [4]
        and info["scales"] == [2.0]
    )
    assert info["tensors"] == 4 and info["parameters"] == 2 * 4 * (64 + 64) + 2 * 4 * (128 + 64)
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "a")])
    assert "mlx format" in res.output and "q_proj" in res.output
    with pytest.raises(CheckpointError, match="the LoRA adapter .*nothere does not exist"):
        open_checkpoint(f"{family['base']}+{tmp_path / 'nothere'}")
    with pytest.raises(
        CheckpointError, match=r"update of model.layers.\d.mlp.down_proj.weight is \(64, 128\) but"
    ):
        open_checkpoint(f"{family['wide']}+{tmp_path / 'a'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        open_checkpoint(f"{family['base']}+{tmp_path / 'empty'}")


def test_inspect_check_scans_an_adapter_for_nonfinite_entries(family, tmp_path):
    mlx_lm_adapter(family["base"], tmp_path / "a", seed=5)
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "a"), "--check"])
    assert res.exit_code == 0 and "non-finite: none" in res.output
    weights = tmp_path / "a" / "adapters.safetensors"
    lora = dict(load_file(str(weights)))
    key = min(k for k in lora if k.endswith("lora_b"))
    bad = lora[key].copy()
    bad.flat[[0, 3]] = [np.nan, np.inf]
    lora[key] = bad
    mx.save_safetensors(str(weights), {k: mx.array(v) for k, v in lora.items()})
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "a"), "--check", "--json"])
    assert res.exit_code == 1
    assert json.loads(res.stdout)["nonfinite"] == [{"tensor": key, "nan": 1, "inf": 1}]


def test_forward_pass_loading_applies_the_adapter(family, lowrank, tmp_path):
    from mlx_lm import load

    from mlxmerge.abliterate.pipeline import abliterate
    from mlxmerge.eval.scoring import load_model
    from mlxmerge.lora import extract_lora

    tokens = mx.array([[1, 17, 42, 99, 7, 250, 3]])
    mlx_lm_adapter(family["base"], tmp_path / "a", seed=5)
    fused_ref = f"{family['base']}+{tmp_path / 'a'}"
    merged = merge({"merge_method": "linear", "dtype": "float32",
                    "models": [{"model": fused_ref, "parameters": {"weight": 1.0}}]}, tmp_path / "m")  # fmt: skip
    want = load(str(merged))[0](tokens)
    assert mx.allclose(load_model(fused_ref)[0](tokens), want, atol=1e-4)
    extract_lora(lowrank["ft"], lowrank["base"], tmp_path / "p", rank=4, format="peft")
    got = load_model(f"{lowrank['base']}+{tmp_path / 'p'}")[0](tokens)
    assert mx.allclose(got, load(str(lowrank["ft"]))[0](tokens), atol=1e-3)
    with pytest.raises(MlxmergeError, match="--adapter writes an adapter for a plain base"):
        abliterate(fused_ref, tmp_path / "abl", adapter=True)


def test_eval_scores_base_plus_adapter_not_the_base_alone(lowrank, tmp_path):
    from mlxmerge.eval.scoring import evaluate
    from mlxmerge.lora import extract_lora

    # evaluate() loaded each checkpoint's folder, which for BASE+ADAPTER is the base alone.
    extract_lora(
        lowrank["ft"], lowrank["base"], tmp_path / "a", rank=4
    )  # exact: the change is rank 4
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 8)
    refs = [str(lowrank["base"]), f"{lowrank['base']}+{tmp_path / 'a'}", str(lowrank["ft"])]
    report = evaluate(refs, [str(text)])
    ppl = {r["model"]: r["metrics"]["perplexity"] for r in report["results"]}
    assert ppl[refs[1]] == pytest.approx(ppl[refs[2]], rel=1e-4)
    assert ppl[refs[1]] != pytest.approx(ppl[refs[0]], rel=1e-3)


def test_sae_collect_reads_base_plus_adapter(lowrank, tmp_path):
    from mlxmerge.lora import extract_lora
    from mlxmerge.sae import collect

    # sae refused BASE+ADAPTER as "not a model folder (no config.json)".
    extract_lora(
        lowrank["ft"], lowrank["base"], tmp_path / "a", rank=4
    )  # exact: the change is rank 4
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 8)
    acts = {}
    for name, ref in (("fused", f"{lowrank['base']}+{tmp_path / 'a'}"), ("ft", lowrank["ft"])):
        collect(ref, [1], text, tmp_path / name, tokens=40, context_size=16)
        acts[name] = np.load(tmp_path / name / "layer_1" / "00000.npy")
    np.testing.assert_allclose(acts["fused"], acts["ft"], atol=1e-4)


def test_moe_router_states_come_from_base_plus_adapter(lowrank, family, tmp_path):
    from mlxmerge.lora import extract_lora
    from mlxmerge.merge.moe import moe

    # The hidden-mode router ran mlx-lm on the base folder alone, without the adapter.
    extract_lora(
        lowrank["ft"], lowrank["base"], tmp_path / "a", rank=4
    )  # exact: the change is rank 4
    experts = [{"source_model": str(family["model_a"]), "positive_prompts": ["one two three"]},
               {"source_model": str(family["model_b"]), "positive_prompts": ["four five"]}]  # fmt: skip
    gates = {}
    for name, base in (("fused", f"{lowrank['base']}+{tmp_path / 'a'}"), ("ft", lowrank["ft"])):
        out = moe(
            {"base_model": str(base), "dtype": "float32", "experts": experts}, tmp_path / name
        )
        gates[name] = load_file(str(out / "model.safetensors"))
    key = "model.layers.1.block_sparse_moe.gate.weight"
    np.testing.assert_allclose(gates["fused"][key], gates["ft"][key], atol=1e-4)
