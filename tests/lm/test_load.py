"""lm.load: models every verb runs through load and run on this machine's device."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import numpy as np
from archs import build_arch, build_arch_tokenizer

from mlxmerge.lm.load import load


def test_bf16_moe_runs_on_cpu(tmp_path):
    # Merges write bf16 by default; MLX's CPU gather_mm (mlx-lm's SwitchLinear) is float32 only,
    # so a bf16 Mixtral failed its first forward pass in eval, sae collect and abliterate.
    tok = build_arch_tokenizer(tmp_path / "tok")
    path = build_arch("mixtral", tmp_path / "mix", tok, dtype=mx.bfloat16)
    tokens = mx.array([[1, 5, 9, 12, 40]])
    model, _ = load(path)
    got = np.array(model(tokens).astype(mx.float32))
    # Reference: the same bf16 weights, the whole model computed in float32.
    ref_model, _ = mlx_lm.load(str(path))
    ref_model.set_dtype(mx.float32)
    ref = np.array(ref_model(tokens))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())
