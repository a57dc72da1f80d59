"""lm.compute: forward passes of bf16 models run in float32 on a CPU, as stored elsewhere."""

from __future__ import annotations

import hashlib
import logging

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from archs import build_arch, build_arch_tokenizer
from mlx.utils import tree_flatten

from mlxmerge.errors import MlxmergeError
from mlxmerge.lm.compute import compute_dtype, resolve_compute_dtype
from mlxmerge.lm.load import load

TOKENS = mx.array([[1, 5, 9, 12, 40, 77, 3]])


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    return build_arch("llama", tmp / "llama", build_arch_tokenizer(tmp / "tok"), dtype=mx.bfloat16)


def _dtypes(model) -> set:
    return {x.dtype for _, x in tree_flatten(model.parameters())}


def _reference(path, dtype=None):
    """mlx-lm's own load of the same files, cast by hand: the independent reference."""
    model, _ = mlx_lm.load(str(path))
    if dtype is not None:
        model.set_dtype(dtype)
    return np.array(model(TOKENS).astype(mx.float32))


def test_decision_table():
    bf16, f32 = {mx.bfloat16}, {mx.float32}
    assert resolve_compute_dtype(bf16, "auto", cpu=True) == mx.float32
    assert resolve_compute_dtype({mx.float16, mx.float32}, "auto", cpu=True) == mx.float32
    assert resolve_compute_dtype(bf16, "auto", cpu=False) is None  # Metal / CUDA: as stored
    assert resolve_compute_dtype(f32, "auto", cpu=True) is None
    assert resolve_compute_dtype(f32, "bfloat16", cpu=True) == mx.bfloat16
    assert resolve_compute_dtype(bf16, "bfloat16", cpu=True) is None
    assert resolve_compute_dtype(bf16, "float16", cpu=False) == mx.float16
    with compute_dtype("float16"):  # the contextual setting is what None means
        assert resolve_compute_dtype(bf16, None, cpu=True) == mx.float16
    assert resolve_compute_dtype(bf16, None, cpu=True) == mx.float32  # restored on exit
    with pytest.raises(MlxmergeError, match="unknown compute dtype 'fp8'"):
        resolve_compute_dtype(bf16, "fp8")


def test_bf16_model_computes_in_float32_on_cpu_and_file_is_untouched(bf16_llama, caplog):
    before = hashlib.sha256((bf16_llama / "model.safetensors").read_bytes()).hexdigest()
    with caplog.at_level(logging.INFO, logger="mlxmerge.lm.compute"):
        model, _ = load(bf16_llama)
    assert _dtypes(model) == {mx.float32}
    np.testing.assert_allclose(
        np.array(model(TOKENS)), _reference(bf16_llama, mx.float32), rtol=1e-5, atol=1e-5
    )
    msg = " ".join(r.getMessage() for r in caplog.records)
    # The log says what it did and the memory it costs: float32 is twice bf16.
    mb = [float(w) for w in msg.replace("MB", " MB").split() if w.replace(".", "").isdigit()]
    assert "bfloat16 weights compute in float32 on the CPU" in msg and mb[0] == pytest.approx(
        2 * mb[1], rel=0.01
    )
    assert hashlib.sha256((bf16_llama / "model.safetensors").read_bytes()).hexdigest() == before


def test_override_keeps_bf16(bf16_llama):
    with compute_dtype("bfloat16"):
        model, _ = load(bf16_llama)
    assert _dtypes(model) == {mx.bfloat16}
    got = np.array(model(TOKENS).astype(mx.float32))
    np.testing.assert_array_equal(got, _reference(bf16_llama))  # mlx-lm's bf16 run, bit for bit


def test_quantized_layers_stay_quantized(bf16_llama, tmp_path):
    from mlx import nn

    from mlxmerge.convert import convert

    q = convert(str(bf16_llama), tmp_path / "q4", dtype="bfloat16", quantize_bits=4, group_size=32)
    model, _ = load(q)
    layers = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(m.weight.dtype == mx.uint32 for m in layers)
    assert all(m.scales.dtype == mx.float32 for m in layers)
    np.testing.assert_allclose(
        np.array(model(TOKENS)), _reference(q, mx.float32), rtol=1e-4, atol=1e-4
    )


def test_bf16_moe_forced_bf16_keeps_experts_float32(tmp_path):
    # MLX's CPU gather_mm takes float32 only: --compute-dtype bfloat16 must not break a MoE.
    from mlx_lm.models.switch_layers import SwitchLinear

    path = build_arch("mixtral", tmp_path / "mix", build_arch_tokenizer(tmp_path / "tok"),
                      dtype=mx.bfloat16)  # fmt: skip
    with compute_dtype("bfloat16"):
        model, _ = load(path)
    kinds = {isinstance(m, SwitchLinear): m.weight.dtype for _, m in model.named_modules()
             if hasattr(m, "weight") and not isinstance(m.weight, dict)}  # fmt: skip
    assert kinds == {True: mx.float32, False: mx.bfloat16}
    assert np.isfinite(np.array(model(TOKENS).astype(mx.float32))).all()


@pytest.mark.parametrize(
    "verb",
    [["eval"], ["soup"], ["refusals"], ["abliterate"], ["moe"], ["sae", "collect"],
     ["sae", "train"], ["sae", "eval"], ["sae", "features"], ["sae", "steer"]],
)  # fmt: skip
def test_every_forward_verb_takes_compute_dtype(verb):
    from click.testing import CliRunner

    from mlxmerge.cli import cli

    r = CliRunner().invoke(cli, [*verb, "--help"])
    assert r.exit_code == 0 and "--compute-dtype [auto|float32|bfloat16|float16]" in r.output


def test_cli_compute_dtype_reaches_the_load(bf16_llama, tmp_path, caplog):
    from click.testing import CliRunner

    from mlxmerge.cli import cli
    from mlxmerge.sae.activations import ActivationStore

    (tmp_path / "t.txt").write_text("the cat sat on the mat\n\nthe dog ran in the park\n")
    args = ["sae", "collect", str(bf16_llama), "--layer", "1", "--data", str(tmp_path / "t.txt"),
            "--tokens", "24", "--context-size", "12"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="mlxmerge.lm.compute"):
        r16 = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "a16"), "--compute-dtype",
                                       "bfloat16"])  # fmt: skip
        r32 = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "a32")])
    assert r16.exit_code == 0 and r32.exit_code == 0, r16.output + r32.output
    msgs = [r.getMessage() for r in caplog.records]
    assert any("compute as stored" in m for m in msgs)
    assert any("compute in float32" in m for m in msgs)
    a16, a32 = (ActivationStore(tmp_path / f).rows(np.arange(24)) for f in ("a16", "a32"))
    # Same activations up to bf16 rounding, and not bit-identical (the option took effect).
    assert not np.array_equal(a16, a32)
    np.testing.assert_allclose(a16, a32, atol=0.05 * np.abs(a32).max())
