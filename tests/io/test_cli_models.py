"""``mlxmerge inspect``, ``convert``, ``doctor``, ``--version`` through CliRunner; BLAS loading."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from mlxmerge import __version__, _blas
from mlxmerge.cli import cli


def count_parameters(folder) -> tuple[int, int]:
    """(parameters, tensors) of an unquantized folder, read with the safetensors library."""
    params = tensors = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as sf:
            for k in sf.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
                params += math.prod(sf.get_slice(k).get_shape())
                tensors += 1
    return params, tensors


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("name", ["llama_fp32_untied", "qwen2_bf16_sharded"])
def test_inspect_json(zoo, name):
    result = run("inspect", zoo[name], "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    params, tensors = count_parameters(zoo[name])
    config = json.loads((zoo[name] / "config.json").read_text())
    assert info["parameters"] == params and info["tensors"] == tensors
    assert info["layers"] == config["num_hidden_layers"] == 4
    assert info["model_type"] == config["model_type"]
    assert info["architecture"] == config["architectures"][0]
    assert info["hidden_size"] == 64 and info["vocab_size"] == 512
    assert info["shards"] == len(list(zoo[name].glob("*.safetensors")))
    assert info["size_on_disk"] == sum(f.stat().st_size for f in zoo[name].glob("*.safetensors"))
    assert info["tied_embeddings"] is False and info["quantization"] is None
    assert info["format"] == "pt"
    assert sum(info["dtypes"].values()) == tensors


def test_inspect_quantized_counts_unpacked_parameters(zoo):
    info = json.loads(run("inspect", zoo["llama_q4_mlx"], "--json").stdout)
    # same config and tying as llama_fp16_tied, so the same logical parameters
    params, tensors = count_parameters(zoo["llama_fp16_tied"])
    assert info["parameters"] == params and info["tensors"] == tensors
    assert info["quantization"] == {"bits": 4, "group_size": 32, "mode": "affine",
                                    "quantized_tensors": 1 + 4 * 7}  # fmt: skip
    assert info["dtypes"] == {"float32": tensors} and info["format"] == "mlx"
    assert info["tied_embeddings"] is True


def test_inspect_text(zoo):
    result = run("inspect", zoo["llama_q4_mlx"])
    assert result.exit_code == 0
    rows = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    rows = {k.strip(): v for k, v in rows.items()}
    params, tensors = count_parameters(zoo["llama_fp16_tied"])
    assert rows["layers"] == "4" and rows["hidden size"] == "64"
    assert rows["parameters"].endswith(f"in {tensors} tensors")
    assert rows["parameters"].startswith(
        f"{params / 1e3:.2f}K" if params < 1e6 else f"{params / 1e6:.2f}M"
    )
    assert rows["quantization"] == "4-bit, group size 32 (affine)"
    assert rows["tied embeddings"] == "yes"
    assert rows["architecture"] == "LlamaForCausalLM (model_type llama)"


def test_convert_command(zoo, tmp_path):
    out = tmp_path / "out"
    result = run("-q", "convert", zoo["llama_fp32_untied"], "-o", out, "--dtype", "float16",
                 "--format", "hf", "--shard-size", "60KB")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {out}"
    assert count_parameters(out) == count_parameters(zoo["llama_fp32_untied"])
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 3
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    q = tmp_path / "q"
    result = run(
        "convert", zoo["llama_fp32_untied"], "-o", q, "--quantize", "8", "--group-size", "32"
    )
    assert result.exit_code == 0, result.output
    assert json.loads((q / "config.json").read_text())["quantization"]["bits"] == 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "{src}", "-o", "{nonempty}"], "folder exists and is not empty"),
        (["convert", "{src}", "-o", "{tmp}/x", "--quantize", "4", "--format", "hf"],
         "quantized output needs --format mlx"),
        (["inspect", "{tmp}/absent"], "no such file or folder"),
        (["inspect", "{bad}"], "header is not valid JSON"),
    ],
)  # fmt: skip
def test_user_error_is_one_line(zoo, tmp_path, args, message):
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "f").write_text("x")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((5).to_bytes(8, "little") + b"{oops")
    fill = {"src": zoo["llama_fp16_tied"], "nonempty": nonempty, "tmp": tmp_path, "bad": bad}
    result = run(*[a.format(**fill) for a in args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert "Traceback" not in result.output


def test_unknown_dtype_is_a_usage_error(zoo, tmp_path):
    result = run("convert", zoo["llama_fp16_tied"], "-o", tmp_path / "x", "--dtype", "int8")
    assert result.exit_code == 2 and "Invalid value for '--dtype'" in result.output


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"mlxmerge {__version__} (mlx ")
    assert "BLAS:" in result.stdout


def test_doctor_json():
    result = run("doctor", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["python"] == platform.python_version()
    assert report["blas"] == _blas.status["loaded"]
    assert report["matmul_gflops_fp32_1024"] > 0
    assert {"mlx", "device", "metal", "cuda", "blas_note"} <= set(report)


# -- BLAS (in fresh interpreters: whether it loads depends on import order) ------------------

STATUS = "import mlxmerge, json; print(json.dumps(mlxmerge._blas.status))"


def blas_status(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", STATUS], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout)


def openblas_present() -> bool:
    return any(os.path.exists(p) for p in _blas._candidates() if os.path.sep in p)


@pytest.mark.skipif(sys.platform != "linux", reason="OpenBLAS is only loaded on Linux")
def test_openblas_is_loaded_when_present():
    if not openblas_present():
        pytest.skip("no OpenBLAS on this machine")
    code = "import mlxmerge, mlx.core; print(open('/proc/self/maps').read().count('libopenblas'))"
    env = {k: v for k, v in os.environ.items() if k not in ("MLXMERGE_NO_BLAS", "MLXMERGE_BLAS")}
    status = json.loads(subprocess.run([sys.executable, "-c", STATUS], env=env, capture_output=True,
                                       text=True, check=True).stdout)  # fmt: skip
    assert status["reason"] == "loaded" and os.path.exists(status["loaded"])
    mapped = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert int(mapped.stdout) > 0  # the library really is in the process


def test_no_blas_env_disables_it():
    status = blas_status(MLXMERGE_NO_BLAS="1")
    assert status["loaded"] is None
    if sys.platform == "linux":
        assert status["reason"] == "disabled by MLXMERGE_NO_BLAS"


def test_too_late_when_mlx_came_first():
    code = "import mlx.core, mlxmerge, json; print(json.dumps(mlxmerge._blas.status))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    status = json.loads(out.stdout)
    assert status["loaded"] is None
    if sys.platform == "linux" and not os.environ.get("MLXMERGE_NO_BLAS"):
        assert "too late" in status["reason"]


def test_inspect_describes_a_checkpoint_mlx_cannot_load(tmp_path):
    import struct

    header = json.dumps(
        {"w": {"dtype": "F8_E4M3", "shape": [4, 8], "data_offsets": [0, 32]}}
    ).encode()
    (tmp_path / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + bytes(32)
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": 1})
    )
    info = json.loads(run("inspect", tmp_path, "--json").stdout)
    assert info["dtypes"] == {"F8_E4M3": 1} and info["parameters"] == 32
