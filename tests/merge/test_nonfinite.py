"""NaN/Inf in weights are found and named: merge, convert, inspect --check, byte scans."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.convert import convert
from mlxmerge.demo.tiny import save_weights
from mlxmerge.errors import NonFiniteError
from mlxmerge.io import finite, open_checkpoint
from mlxmerge.merge.runner import merge

BROKEN = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def broken(family, tmp_path_factory):
    """model_a with one NaN and one Inf in BROKEN, stored in float32 and in bfloat16."""
    ck = open_checkpoint(family["model_a"])
    w = {n: ck.get(n) for n in ck.names()}
    x = np.array(w[BROKEN])
    x[0, 0], x[1, 1] = np.nan, -np.inf
    w[BROKEN] = mx.array(x)
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for dtype in (mx.float32, mx.bfloat16):
        out[dtype] = save_weights(root / str(dtype), w, ck.config, family["tokenizer"],
                                  dtype=dtype, title="broken")  # fmt: skip
    return out


def two_model(method, a, b, base=None, **params):
    recipe = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 0.5, **params}},
                         {"model": str(b), "parameters": {"weight": 0.5, **params}}]}  # fmt: skip
    if base:
        recipe["base_model"] = str(base)
        recipe["models"].insert(0, {"model": str(base)})
    return recipe


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merge_stops_naming_model_tensor_and_counts(family, broken, tmp_path, method):
    bad = broken[mx.float32]
    base = family["base"] if method == "ties" else None
    params = {"density": 0.5} if method == "ties" else {}
    recipe = two_model(method, family["model_b"], bad, base, **params)
    with pytest.raises(NonFiniteError, match=rf"{bad}: tensor {BROKEN} holds 1 NaN and 1 Inf"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing renamed into place
    assert not list(tmp_path.iterdir())  # no partial folder left beside it


def test_allow_nonfinite_warns_and_writes(family, broken, tmp_path, caplog):
    recipe = two_model("linear", family["model_b"], broken[mx.float32])
    res = CliRunner().invoke(
        cli, ["merge", "--allow-nonfinite", "-o", str(tmp_path / "o"), _yaml(recipe, tmp_path)]
    )
    assert res.exit_code == 0, res.output
    assert f"tensor {BROKEN} holds 1 NaN and 1 Inf" in caplog.text  # a warning on stderr
    got = np.array(open_checkpoint(tmp_path / "o").get(BROKEN, mx.float32))
    assert np.isnan(got[0, 0]) and np.isinf(got[1, 1]) and np.isfinite(got).sum() == got.size - 2


def test_cli_error_is_one_line(family, broken, tmp_path):
    res = CliRunner().invoke(
        cli,
        [
            "linear",
            str(family["model_b"]),
            str(broken[mx.float32]),
            "--weight",
            "1",
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and BROKEN in lines[0] and "--allow-nonfinite" in lines[0]


def test_raw_copy_is_scanned_too(broken, tmp_path):
    # passthrough of bf16 into bf16 copies bytes file to file: the byte scan must catch it
    res = CliRunner().invoke(
        cli, ["frankenmerge", "--slice", f"{broken[mx.bfloat16]}:0-4", "-o", str(tmp_path / "f")]
    )
    assert res.exit_code == 1 and f"tensor {BROKEN} holds 1 NaN and 1 Inf" in res.output


def test_fp16_overflow_in_output_names_tensor_and_method(family, tmp_path):
    recipe = two_model("linear", family["model_a"], family["model_b"])
    recipe["parameters"] = {"normalize": False}
    for m in recipe["models"]:
        m["parameters"] = {"weight": 1e7}
    recipe["out_dtype"] = "float16"
    with pytest.raises(NonFiniteError, match=r"linear merge: output tensor \S+ holds 0 NaN and"):
        merge(recipe, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_convert_checks_inputs_and_fp16_overflow(family, broken, tmp_path):
    for src, dtype in ((broken[mx.float32], "bfloat16"), (broken[mx.bfloat16], "bfloat16")):
        with pytest.raises(NonFiniteError, match=rf"tensor {BROKEN} holds 1 NaN and 1 Inf"):
            convert(str(src), tmp_path / "c", dtype=dtype)
    out = convert(str(broken[mx.float32]), tmp_path / "c", dtype="float32", allow_nonfinite=True)
    assert np.isnan(np.array(open_checkpoint(out).get(BROKEN))).sum() == 1
    # a float32 model with a value beyond float16's range overflows on the cast
    ck = open_checkpoint(family["model_a"])
    w = {n: ck.get(n) for n in ck.names()}
    w["model.norm.weight"] = w["model.norm.weight"] * 0 + 1e6
    big = save_weights(tmp_path / "big", w, ck.config, family["tokenizer"], title="big")
    with pytest.raises(
        NonFiniteError, match="convert: output tensor model.norm.weight holds 0 NaN"
    ):
        convert(str(big), tmp_path / "c16", dtype="float16")


def test_inspect_check_lists_tensors_with_counts(family, broken):
    res = CliRunner().invoke(cli, ["inspect", "--check", "--json", str(broken[mx.bfloat16])])
    assert res.exit_code == 1
    assert json.loads(res.stdout)["nonfinite"] == [{"tensor": BROKEN, "nan": 1, "inf": 1}]
    clean = CliRunner().invoke(cli, ["inspect", "--check", str(family["model_a"])])
    assert clean.exit_code == 0 and "non-finite: none" in clean.output


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_byte_scan_counts_match_numpy(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(finite, "SCAN_CHUNK", 4096)  # many chunks, odd boundaries
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 129)).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, 7, replace=False)] = np.nan
    flat[rng.choice(flat.size, 5, replace=False)] = np.inf
    flat[rng.choice(flat.size, 3, replace=False)] = -np.inf
    arr = mx.array(x).astype(dtype)
    mx.save_safetensors(str(tmp_path / "t.safetensors"), {"pad": mx.zeros((3,)), "t": arr})
    e = open_checkpoint(tmp_path / "t.safetensors").entries["t"]
    want = (int(np.isnan(x).sum()), int(np.isinf(x).sum()))
    assert finite.count_bytes(e.file, e.data_start + e.begin, e.nbytes, dtype) == want
    assert finite.count_nonfinite(arr) == want


def _yaml(recipe, tmp_path):
    import yaml

    p = tmp_path / "r.yml"
    p.write_text(yaml.safe_dump(recipe))
    return str(p)


def test_bit_test_agrees_with_isfinite_on_every_16_bit_pattern():
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    as_bf16 = (patterns.astype(np.uint32) << 16).view(np.float32)
    as_fp16 = patterns.view(np.float16)
    for values, dtype in ((as_bf16, mx.bfloat16), (as_fp16, mx.float16)):
        mask = finite.EXPONENT_MASKS[dtype][1]
        got = np.array([finite.words_finite(patterns[i : i + 1], mask) for i in range(1 << 16)])
        np.testing.assert_array_equal(got, np.isfinite(values))
    words = np.random.default_rng(0).integers(0, 1 << 32, 20000, dtype=np.uint64).astype(np.uint32)
    words[:4] = [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F7FFFFF]  # ±Inf, NaN, largest finite
    mask = finite.EXPONENT_MASKS[mx.float32][1]
    got = np.array([finite.words_finite(words[i : i + 1], mask) for i in range(words.size)])
    np.testing.assert_array_equal(got, np.isfinite(words.view(np.float32)))
