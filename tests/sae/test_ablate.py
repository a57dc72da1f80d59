"""``sae ablate``: SAE decoder directions edited out of every residual writer, verified in numpy on
the residual the SAE reads, on the features' activations and on the next-token distribution."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from mlxmerge.cli import cli
from mlxmerge.lm.logprobs import kl_divergence
from mlxmerge.sae import load_sae, save_sae
from mlxmerge.sae.ablate import ablate_features
from mlxmerge.sae.activations import capture_layers, load_model, pack_sequences, read_texts
from mlxmerge.sae.model import SAEConfig, SAEError, encode


def _residual(model_dir, text_file, layer, tokens=600):
    m, tok = load_model(model_dir)
    rows = mx.array(pack_sequences(tok, read_texts(text_file), 64, tokens))
    with capture_layers(m, [layer]) as outs:
        logits = m(rows)
        h = outs[layer].astype(mx.float32)
    return np.array(h, np.float64).reshape(-1, h.shape[-1]), logits.astype(mx.float32)


def test_residual_has_no_component_in_the_features_span(tmp_path, trained_sae, tiny_model,
                                                        text_file):  # fmt: skip
    cfg, p = load_sae(trained_sae[0])
    w_dec = np.array(p["W_dec"], np.float64)
    h0, _ = _residual(tiny_model, text_file, cfg.hook_layer)
    for feats in ([5], [5, 17, 40]):
        out = tmp_path / "_".join(map(str, feats))
        r = CliRunner().invoke(cli, ["sae", "ablate", str(trained_sae[0]), str(tiny_model),
                                     *[a for f in feats for a in ("--feature", str(f))],
                                     "-o", str(out), "--dtype", "float32"])  # fmt: skip
        assert r.exit_code == 0, r.output
        q = np.linalg.qr(w_dec[feats].T)[0]  # (d, m) orthonormal basis of the span
        h1, _ = _residual(out, text_file, cfg.hook_layer)
        before = np.linalg.norm(h0 @ q, axis=1) / np.linalg.norm(h0, axis=1)
        after = np.linalg.norm(h1 @ q, axis=1) / np.linalg.norm(h1, axis=1)
        assert before.mean() > 0.05 and after.max() < 1e-5
        assert json.loads((out / "sae_ablation.json").read_text())["features"] == feats
    # the weight edit is W − Qᵀ(Q W) on a residual writer, other tensors copied unchanged
    w0 = load_file(str(tiny_model / "model.safetensors"))
    w1 = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    qq = q @ q.T
    np.testing.assert_allclose(w1[name], w0[name] - qq @ w0[name], atol=1e-5)
    np.testing.assert_array_equal(w1["model.layers.1.mlp.up_proj.weight"],
                                  w0["model.layers.1.mlp.up_proj.weight"])  # fmt: skip


def _planted_sae(tmp_path, layer=0, d=64):
    """ReLU SAE over a random orthonormal basis Q and its negation: z = [ReLU(Qh), ReLU(−Qh)],
    x̂ = h exactly; feature i reads and writes the same direction q_i."""
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))[0].T.astype(np.float32)
    w = mx.array(np.concatenate([q, -q]))
    cfg = SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", hook_layer=layer)
    params = {"encoder": w, "W_dec": w, "b_enc": mx.zeros((2 * d,)), "b_dec": mx.zeros((d,))}
    return save_sae(tmp_path / "planted", cfg, params), cfg, params, q


def test_feature_goes_to_zero_others_move_little_and_kl_is_small(tmp_path, tiny_model,
                                                                 text_file, jsonl_file):  # fmt: skip
    folder, cfg, params, q = _planted_sae(tmp_path)
    h0, _ = _residual(tiny_model, text_file, 0)
    f = int(np.argmin(np.abs(h0 @ q.T).mean(0)))  # the direction carrying the least residual
    ablate_features(folder, tiny_model, tmp_path / "out", features=[f], dtype="float32")
    h1, _ = _residual(tmp_path / "out", text_file, 0)
    z0 = np.array(encode(params, cfg, mx.array(h0.astype(np.float32))))
    z1 = np.array(encode(params, cfg, mx.array(h1.astype(np.float32))))
    pair, others = [f, f + 64], np.setdiff1d(np.arange(128), [f, f + 64])
    assert z0[:, pair].sum(1).mean() > 0.1 and z1[:, pair].max() < 1e-4  # gone on every token
    # the other features change only through later computations seeing the edited residual
    moved = np.abs(z1[:, others] - z0[:, others]).sum() / np.abs(z0[:, others]).sum()
    assert moved < 0.3  # measured 0.10 on this tiny random model
    # next-token KL on other text: well below zero-ablating the whole block output
    m, tok = load_model(tiny_model)
    m2, _ = load_model(tmp_path / "out")
    rows = mx.array(pack_sequences(tok, read_texts(jsonl_file), 64, 600))
    clean = m(rows).astype(mx.float32)
    with capture_layers(m, [0], {0: mx.zeros_like}, record=False):
        zeroed = m(rows).astype(mx.float32)
    kl = kl_divergence(clean, m2(rows).astype(mx.float32)).mean().item()
    kl_zero = kl_divergence(clean, zeroed).mean().item()
    assert 0 < kl < 0.25 * kl_zero  # measured about a tenth
    # --scale 2 amplifies instead: the feature fires more than before
    ablate_features(folder, tiny_model, tmp_path / "amp", features=[f], scale=2.0, dtype="float32")
    h2, _ = _residual(tmp_path / "amp", text_file, 0)
    z2 = np.array(encode(params, cfg, mx.array(h2.astype(np.float32))))
    assert z2[:, pair].sum(1).mean() > 1.5 * z0[:, pair].sum(1).mean()


def test_ablate_errors(tmp_path, trained_sae, tiny_model):
    with pytest.raises(SAEError, match="feature 999 does not exist"):
        ablate_features(trained_sae[0], tiny_model, tmp_path / "x", features=[999])
    with pytest.raises(SAEError, match="at least one --feature"):
        ablate_features(trained_sae[0], tiny_model, tmp_path / "x", features=[])
    folder, *_ = _planted_sae(tmp_path)  # features i and i + 64 are ± the same direction
    with pytest.raises(SAEError, match="linearly dependent"):
        ablate_features(folder, tiny_model, tmp_path / "x", features=[3, 67])
    narrow = SAEConfig(d_in=32, d_sae=64, k=4, hook_layer=1)
    from mlxmerge.sae.model import init_params

    save_sae(tmp_path / "narrow", narrow, init_params(narrow))
    with pytest.raises(SAEError, match="d_in=32 but .* residual stream is 64 wide"):
        ablate_features(tmp_path / "narrow", tiny_model, tmp_path / "x", features=[1])
    assert not (tmp_path / "x").exists()
