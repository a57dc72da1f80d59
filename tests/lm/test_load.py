"""lm.load: models every verb runs through load and run on this machine's device."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
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


def test_a_non_finite_weight_stops_forward_pass_verbs_in_one_line(tmp_path):
    """eval, sae collect, abliterate, moe all load through lm.load: NaN/Inf is named there."""
    import json

    from click.testing import CliRunner

    from mlxmerge.cli import cli
    from mlxmerge.errors import NonFiniteError
    from mlxmerge.io import open_checkpoint
    from mlxmerge.io.model_folder import ModelCard, write_model

    tok = build_arch_tokenizer(tmp_path / "tok")
    good = build_arch("llama", tmp_path / "llama", tok)
    ck = open_checkpoint(good)
    name = "model.layers.1.mlp.up_proj.weight"

    def compute(n):
        x = ck.get(n)
        if n != name:
            return x
        x = np.array(x)
        x[0, :3] = np.nan
        return mx.array(x)

    bad = write_model(tmp_path / "bad", [(n, ck.shape(n)) for n in ck.names()], compute,
                      config=ck.config, tokenizer_source=good, card=ModelCard(title="bad"),
                      dtype=mx.float32)  # fmt: skip
    with pytest.raises(
        NonFiniteError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight holds 3 NaN"
    ):
        load(bad, verb="eval")
    load(good, verb="eval")  # the same model without the NaN loads
    (tmp_path / "t.txt").write_text("the cat sat on the mat\\n")
    r = CliRunner().invoke(cli, ["sae", "collect", str(bad), "--layer", "1", "--data",
                                 str(tmp_path / "t.txt"), "-o", str(tmp_path / "acts")])  # fmt: skip
    assert r.exit_code != 0 and "3 NaN" in r.output and "Traceback" not in r.output
    assert json.loads((bad / "config.json").read_text())["model_type"] == "llama"
