"""``sae steer`` reports how big its edit is against the residual norm, warns when it is too small
to matter, and takes ``--scale`` in residual norms with ``--relative``."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.sae import load_sae, steer
from mlxmerge.sae.activations import capture_layers, load_model
from mlxmerge.sae.model import encode


def test_edit_size_against_the_residual_norm(trained_sae, tiny_model):
    m, tok = load_model(tiny_model)
    ids = tok.encode("one two three four")
    with capture_layers(m, [2]) as outs:
        m(mx.array([ids]))
        norms = np.linalg.norm(np.array(outs[2].astype(mx.float32), np.float64), axis=-1)
    median = float(np.median(norms))
    tiny = steer(trained_sae[0], tiny_model, "one two three four", feature=3, scale=1e-3,
                 max_tokens=3)  # fmt: skip
    assert tiny["residual_norm"] == pytest.approx(median, rel=1e-5)
    assert tiny["edit_ratio"] == pytest.approx(1e-3 / median, rel=1e-3)
    assert len(tiny["warnings"]) == 1 and "--relative" in tiny["warnings"][0]
    rel = steer(trained_sae[0], tiny_model, "one two three four", feature=3, scale=0.5,
                relative=True, max_tokens=3)  # fmt: skip
    assert rel["edit_ratio"] == pytest.approx(0.5, rel=1e-3) and rel["warnings"] == []
    zero = steer(trained_sae[0], tiny_model, "one two three four", feature=3, scale=0.0,
                 max_tokens=3)  # fmt: skip
    assert zero["edit_ratio"] == 0 and zero["warnings"] == []  # no edit: nothing to warn about


def test_feature_page_leaves_out_outlier_norm_tokens(trained_sae, tiny_model, text_file, tmp_path):
    from mlxmerge.sae import feature_report
    from mlxmerge.sae.activations import iter_activations, read_texts

    m, tok = load_model(tiny_model)
    acts = np.concatenate([a[2] for a, _, _ in iter_activations(
        m, tok, read_texts(text_file), [2], tokens=800, context_size=64)])  # fmt: skip
    norms = np.linalg.norm(acts, axis=1)
    # factor 1: every token above the median norm counts as an outlier
    rep = feature_report(trained_sae[0], tiny_model, text_file, tmp_path / "rep", n_features=6,
                         tokens=800, context_size=64, outlier_factor=1.0)  # fmt: skip
    outlier = norms > np.median(norms)
    assert rep["outlier_tokens"] == int(outlier.sum()) > 0
    assert rep["tokens"] + rep["outlier_tokens"] == len(norms)
    cfg, params = load_sae(trained_sae[0])
    z = np.array(encode(params, cfg, mx.array(acts)))[~outlier]
    for f in rep["features"]:  # densities over the kept tokens only
        assert f["density"] == pytest.approx((z[:, f["index"]] > 1e-3).mean())
