"""``diff`` statistics against numpy, and its flagging of divergent models."""

import json

import mlx.core as mx
import numpy as np
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.io import layer_index, open_checkpoint
from mlxmerge.merge.diagnostics import diff_models, tensor_group


def flat(path, layer, group):
    ck = open_checkpoint(path)
    names = [n for n in ck.names() if layer_index(n) == layer and tensor_group(n) == group]
    return np.concatenate([np.array(ck.get(n, mx.float32)).ravel() for n in names]).astype(
        np.float64
    )


def test_layer_group_statistics_match_numpy(family):
    report = diff_models(str(family["model_a"]), str(family["model_b"]), str(family["base"]))
    row = next(r for r in report["rows"] if r["layer"] == 2 and r["group"] == "mlp")
    a, b, base = (flat(family[k], 2, "mlp") for k in ("model_a", "model_b", "base"))
    ta, tb = a - base, b - base
    assert (
        row["cosine"] == np.float64(a @ b / np.linalg.norm(a) / np.linalg.norm(b)).round(12)
        or abs(row["cosine"] - a @ b / np.linalg.norm(a) / np.linalg.norm(b)) < 1e-5
    )
    assert abs(row["rel_diff"] - np.linalg.norm(a - b) / np.linalg.norm(a)) < 1e-4
    assert abs(row["task_norm_a"] - np.linalg.norm(ta) / np.linalg.norm(base)) < 1e-4
    both = (ta != 0) & (tb != 0)
    conflict = np.mean(np.sign(ta[both]) != np.sign(tb[both]))
    assert abs(row["sign_conflict"] - conflict) < 1e-3
    assert report["warnings"] == []


def test_divergent_models_are_flagged(family, tmp_path):
    r = CliRunner().invoke(cli, ["diff", str(family["model_a"]), str(family["stranger"]),
                                 "--base", str(family["base"]), "--json", "--plot", str(tmp_path / "d.png")])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["overall"]["cosine"] < 0.9
    assert any("do not look like fine-tunes" in w for w in report["warnings"])
    assert any("likely a different base" in w for w in report["warnings"])
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
