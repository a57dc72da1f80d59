"""--quantize on merges: the written model is mx.quantize of the float merge, and mlx-lm loads it."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.errors import MlxmergeError
from mlxmerge.merge.runner import merge
from mlxmerge.merge.soup import soup


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def stored(folder) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def test_quantized_method_command_is_quantize_of_the_float_merge(family, tmp_path):
    from mlx_lm import load

    common = ["linear", family["model_a"], family["model_b"], "--weight", "0.3", "--weight", "0.7"]
    run(*common, "--out-dtype", "float32", "-o", tmp_path / "f")
    run(
        *common,
        "--out-dtype",
        "float32",
        "--quantize",
        "4",
        "--group-size",
        "32",
        "-o",
        tmp_path / "q",
    )
    flt, q = stored(tmp_path / "f"), stored(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert "4-bit" in (tmp_path / "q" / "README.md").read_text()
    quantized = [k for k in flt if k.removesuffix(".weight") + ".scales" in q]
    assert "model.layers.0.mlp.down_proj.weight" in quantized
    assert "model.norm.weight" not in quantized and len(quantized) == 1 + 7 * 4
    model, _ = load(str(tmp_path / "q"))
    proj = model.model.layers[1].mlp.up_proj
    assert proj.bits == 4 and proj.group_size == 32  # mlx-lm built QuantizedLinear layers
    for k in quantized:
        ref = mx.dequantize(*mx.quantize(flt[k], group_size=32, bits=4), group_size=32, bits=4)
        p = k.removesuffix(".weight")
        got = mx.dequantize(q[k], q[f"{p}.scales"], q[f"{p}.biases"], group_size=32, bits=4)
        assert mx.array_equal(got, ref), k
    for k in set(flt) - set(quantized):
        assert mx.array_equal(q[k], flt[k]), k
    ref_w = mx.dequantize(*mx.quantize(flt["model.layers.1.mlp.up_proj.weight"], group_size=32, bits=4),
                          group_size=32, bits=4)  # fmt: skip
    x = mx.random.normal((3, 64))
    assert mx.allclose(proj(x), x @ ref_w.T, atol=1e-4)


def test_recipe_and_frankenmerge_quantize_8_bit(family, tmp_path):
    recipe = {"merge_method": "slerp", "base_model": str(family["base"]),
              "models": [{"model": str(family["base"])}, {"model": str(family["model_a"])}],
              "parameters": {"t": 0.5}}  # fmt: skip
    merge(recipe, tmp_path / "f", out_dtype="bfloat16")
    merge(recipe, tmp_path / "q", out_dtype="bfloat16", quantize_bits=8, group_size=64)
    flt, q = stored(tmp_path / "f"), stored(tmp_path / "q")
    k = "model.layers.2.self_attn.o_proj"
    ref = mx.dequantize(*mx.quantize(flt[f"{k}.weight"], bits=8), bits=8)
    assert mx.array_equal(
        mx.dequantize(q[f"{k}.weight"], q[f"{k}.scales"], q[f"{k}.biases"], bits=8), ref
    )
    run("frankenmerge", "--slice", f"{family['base']}:0-2", "--slice", f"{family['model_a']}:1-3",
        "--quantize", "8", "-o", tmp_path / "fr")  # fmt: skip
    config = json.loads((tmp_path / "fr" / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["num_hidden_layers"] == 4


def test_dry_run_sizes_the_quantized_output(family, tmp_path):
    common = [
        "linear",
        family["model_a"],
        family["model_b"],
        "--weight",
        "1",
        "--dry-run",
        "--json",
    ]
    flt = json.loads(run(*common, "--out-dtype", "float32").stdout)
    q = json.loads(
        run(*common, "--out-dtype", "float32", "--quantize", "4", "--group-size", "32").output
    )
    assert q["quantization"]["bits"] == 4 and "quantization" not in flt
    run(
        *common[:-2],
        "--quantize",
        "4",
        "--group-size",
        "32",
        "--out-dtype",
        "float32",
        "-o",
        tmp_path / "q",
    )
    written = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert q["output_bytes"] < flt["output_bytes"] / 3
    assert 0 < written - q["output_bytes"] < 20_000  # only the safetensors headers on top


def test_quantize_errors(family, tmp_path):
    models = [family["model_a"], family["model_b"]]
    result = CliRunner().invoke(cli, ["linear", *map(str, models), "--weight", "1", "--quantize", "4", "--format", "hf",
                                      "-o", str(tmp_path / "hf")])  # fmt: skip
    assert result.exit_code == 1 and "needs --format mlx" in result.output
    assert not (tmp_path / "hf").exists()
    recipe = {
        "merge_method": "linear",
        "models": [str(m) for m in models],
        "parameters": {"weight": 1},
    }
    with pytest.raises(MlxmergeError, match="group size 48"):
        merge(recipe, tmp_path / "x",
              quantize_bits=4, group_size=48)  # fmt: skip
    with pytest.raises(MlxmergeError, match="quantized soup needs --format mlx"):
        soup(
            models, tmp_path / "s", eval_task=tmp_path / "none.jsonl", quantize_bits=4, layout="hf"
        )
