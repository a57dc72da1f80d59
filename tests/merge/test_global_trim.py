"""TIES with the paper's model-wide trim (trim_scope: model) against a numpy reference."""

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.errors import RecipeError
from mlxmerge.io import open_checkpoint
from mlxmerge.merge.runner import merge


def load(path):
    ck = open_checkpoint(path)
    return {n: np.array(ck.get(n, mx.float32)) for n in ck.names()}


def test_model_wide_trim_matches_numpy(family, tmp_path):
    base, a, b = load(family["base"]), load(family["model_a"]), load(family["model_b"])
    names = sorted(base)
    density = 0.2
    kept = []
    for m in (a, b):
        flat = np.concatenate([np.abs(m[n] - base[n]).ravel() for n in names])
        k = int(density * flat.size)
        thr = np.sort(flat)[::-1][k - 1]
        kept.append(
            {n: np.where(np.abs(m[n] - base[n]) >= thr, m[n] - base[n], 0.0) for n in names}
        )
    recipe = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family[k]), "parameters": {"weight": 1.0, "density": density}}
            for k in ("model_a", "model_b")
        ],
        "parameters": {"trim_scope": "model"},
        "out_dtype": "float32",
    }
    got = load(merge(recipe, tmp_path / "t"))
    for n in names:
        d = np.stack([kept[0][n], kept[1][n]])
        s = np.where(d.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(d) == s
        mix = np.where(agree, d, 0).sum(0) / np.maximum(
            agree.sum(0), 1
        )  # weights 1: weight sum = count
        mix = np.where(agree.sum(0) == 0, 0.0, mix)
        np.testing.assert_allclose(got[n], base[n] + mix, rtol=1e-5, atol=1e-6, err_msg=n)


def test_model_wide_trim_refuses_gradients(family, tmp_path):
    recipe = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["model_a"]), "parameters": {"weight": 1.0, "density": [0.1, 0.5]}}
        ],
        "parameters": {"trim_scope": "model"},
    }
    with pytest.raises(RecipeError, match="one density per model"):
        merge(recipe, tmp_path / "t")
