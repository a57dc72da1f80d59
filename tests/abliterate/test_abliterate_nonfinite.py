"""Abliteration refuses a non-finite direction and names a non-finite weight it reads."""

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.abliterate.pipeline import orthogonalize_model
from mlxmerge.demo.tiny import save_weights
from mlxmerge.errors import MlxmergeError, NonFiniteError
from mlxmerge.io import open_checkpoint


def test_non_finite_direction_is_refused(family, tmp_path):
    r = np.ones(64, dtype=np.float32)
    r[3] = np.nan
    with pytest.raises(MlxmergeError, match="refusal direction holds 1 non-finite"):
        orthogonalize_model(family["model_a"], tmp_path / "o", r)
    assert not (tmp_path / "o").exists()


def test_non_finite_weight_is_named(family, tmp_path):
    ck = open_checkpoint(family["model_a"])
    w = {n: ck.get(n) for n in ck.names()}
    name = "model.layers.2.self_attn.o_proj.weight"  # a residual writer the edit reads
    x = np.array(w[name])
    x[5, 7] = np.inf
    w[name] = mx.array(x)
    bad = save_weights(tmp_path / "bad", w, ck.config, family["tokenizer"], title="bad")
    r = np.random.default_rng(0).normal(size=64).astype(np.float32)
    with pytest.raises(NonFiniteError, match=rf"tensor {name} holds 0 NaN and 1 Inf"):
        orthogonalize_model(bad, tmp_path / "o", r)
    assert not (tmp_path / "o").exists()


def test_allow_nonfinite_reaches_the_weight_edit(family, tmp_path, monkeypatch):
    """`abliterate --allow-nonfinite` gets to orthogonalize_model, which then warns and writes."""
    from click.testing import CliRunner

    from mlxmerge.abliterate import pipeline
    from mlxmerge.cli import cli

    seen = {}

    def fake_run(model, output, **kw):
        seen.update(kw)
        return {"output": str(output)}

    monkeypatch.setattr(pipeline, "abliterate", fake_run)
    CliRunner().invoke(cli, ["abliterate", str(family["model_a"]), "-o", str(tmp_path / "x"),
                             "--allow-nonfinite"])  # fmt: skip
    assert seen.get("allow_nonfinite") is True

    ck = open_checkpoint(family["model_a"])
    w = {n: ck.get(n) for n in ck.names()}
    name = "model.layers.2.self_attn.o_proj.weight"
    x = np.array(w[name])
    x[5, 7] = np.nan
    w[name] = mx.array(x)
    bad = save_weights(tmp_path / "bad", w, ck.config, family["tokenizer"], title="bad")
    r = np.random.default_rng(0).normal(size=64).astype(np.float32)
    orthogonalize_model(bad, tmp_path / "o", r, allow_nonfinite=True)
    assert (tmp_path / "o" / "config.json").is_file()
