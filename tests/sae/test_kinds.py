"""JumpReLU and Matryoshka BatchTopK training against numpy references of their forward and
gradient; every kind trains, saves in SAELens v6 form and loads back with equal outputs.

References written here in numpy from the papers / SAELens (sae_lens/saes/jumprelu_sae.py,
matryoshka_batchtopk_sae.py), with K(u) = [|u| < 1/2] the rectangle kernel of bandwidth eps:
  jumprelu:  z = pre·H(pre − θ); loss = mean_n ‖x − x̂‖² + λ·mean_n Σ_j H(pre − θ)
             ∂z/∂pre = H, ∂z/∂θ := −(θ/eps)·K((pre − θ)/eps), ∂H/∂θ := −(1/eps)·K(...), ∂H/∂pre := 0
  matryoshka: BatchTopK z; loss = Σ_{w in widths} mean_n ‖x − (z[:, :w] W_dec[:w] + b_dec)‖² / V
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

from mlxmerge.demo.toy_sae import ToyData
from mlxmerge.sae.kinds import KINDS
from mlxmerge.sae.model import SAEConfig, SAEError, decode, encode
from mlxmerge.sae.saelens import load_sae, save_sae
from mlxmerge.sae.train import TrainConfig, Trainer, train_sae


def _rand_params(tr, rng, scale=0.5):
    p = {}
    for name, v in tr.params.items():
        p[name] = mx.array((scale * rng.standard_normal(v.shape)).astype(np.float32))
    return p


def _np(p):
    return {k: np.array(v, dtype=np.float64) for k, v in p.items()}


def _trainer(arch, d_in=6, d_sae=12, k=2, **kw):
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k)
    tc = TrainConfig(k=k, d_sae=d_sae, architecture=arch, batch_size=16, tokens=160, **kw)
    sample = np.random.default_rng(0).standard_normal((64, d_in)).astype(np.float32)
    return Trainer(cfg, tc, sample, steps=10)


def test_jumprelu_forward_and_pseudo_gradients_match_numpy():
    eps, lam = 0.6, 0.3  # a wide kernel so many pre-activations fall inside it
    tr = _trainer("jumprelu", jumprelu_bandwidth=eps, l0_coefficient=lam)
    rng = np.random.default_rng(1)
    params = _rand_params(tr, rng)
    params["threshold"] = mx.array(rng.uniform(0.05, 0.6, 12).astype(np.float32))
    x = mx.array(rng.standard_normal((16, 6)).astype(np.float32))
    dead = mx.zeros((12,), dtype=mx.bool_)
    (loss, *_), grads = mx.value_and_grad(tr._loss)(params, x, dead, 0)

    p, xn, b = _np(params), np.array(x, np.float64), 16
    xc = xn - p["b_dec"]
    pre = xc @ p["encoder"].T + p["b_enc"]
    th = p["threshold"]
    h = (pre > th).astype(np.float64)
    z = pre * h
    e = xn - (z @ p["W_dec"] + p["b_dec"])
    ref_loss = (e**2).sum(1).mean() + lam * h.sum(1).mean()
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert 0 < h.mean() < 1
    kern = (np.abs((pre - th) / eps) < 0.5).astype(np.float64)
    assert kern.sum() > 5  # the threshold gradient is not trivially zero
    r = -2 * e / b  # dL/dx̂
    g_z = r @ p["W_dec"].T  # (B, d_sae)
    g_pre = g_z * h
    g_theta = (g_z * -(th / eps) * kern).sum(0) + lam / b * (-(1 / eps) * kern).sum(0)
    ref = {
        "W_dec": z.T @ r,
        "encoder": g_pre.T @ xc,
        "b_enc": g_pre.sum(0),
        "b_dec": r.sum(0) - g_pre.sum(0) @ p["encoder"],
        "threshold": g_theta,
    }
    assert set(grads) == set(ref)
    for name, want in ref.items():
        np.testing.assert_allclose(np.array(grads[name]), want, rtol=1e-4, atol=1e-5, err_msg=name)


def _batchtopk_dense(pre, k):
    """numpy BatchTopK: the k·B largest ReLU'd pre-activations of the batch, others 0."""
    a = np.maximum(pre, 0).ravel()
    keep = np.argsort(-a, kind="stable")[: k * pre.shape[0]]
    z = np.zeros_like(a)
    z[keep] = a[keep]
    return z.reshape(pre.shape)


def test_matryoshka_forward_and_gradient_match_numpy():
    widths = (3, 7, 12)
    tr = _trainer("matryoshka_batchtopk", k=3, matryoshka_widths=widths, auxk_alpha=0)
    rng = np.random.default_rng(2)
    params = _rand_params(tr, rng)
    x = mx.array(rng.standard_normal((16, 6)).astype(np.float32))
    (loss, *_), grads = mx.value_and_grad(tr._loss)(params, x, mx.zeros((12,), mx.bool_), 0)

    p, xn, b, v = _np(params), np.array(x, np.float64), 16, tr.var_total.item()
    xc = xn - p["b_dec"]
    pre = xc @ p["encoder"].T + p["b_enc"]
    z = _batchtopk_dense(pre, 3)
    sel = (z > 0).astype(np.float64)
    ref_loss, g_z, g_wdec, g_bdec = 0.0, np.zeros_like(z), np.zeros_like(p["W_dec"]), 0
    for w in widths:  # every prefix reconstructs; the last is the whole dictionary
        e = xn - (z[:, :w] @ p["W_dec"][:w] + p["b_dec"])
        ref_loss += (e**2).sum(1).mean() / v
        r = -2 * e / (b * v)
        g_z[:, :w] += r @ p["W_dec"][:w].T
        g_wdec[:w] += z[:, :w].T @ r
        g_bdec = g_bdec + r.sum(0)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    g_pre = g_z * sel
    ref = {
        "W_dec": g_wdec,
        "encoder": g_pre.T @ xc,
        "b_enc": g_pre.sum(0),
        "b_dec": g_bdec - g_pre.sum(0) @ p["encoder"],
    }
    for name, want in ref.items():
        np.testing.assert_allclose(np.array(grads[name]), want, rtol=1e-4, atol=1e-5, err_msg=name)
    # the inner levels matter: without them the loss is plain BatchTopK's
    e = xn - (z @ p["W_dec"] + p["b_dec"])
    assert ref_loss > 1.5 * (e**2).sum(1).mean() / v


def _toy_train(arch, **kw):
    src = ToyData(d_in=16, n_features=32, mean_active=3.0, seed=0)
    tc = TrainConfig(k=3, expansion=2, architecture=arch, tokens=256 * 60, batch_size=256,
                     lr=3e-3, log_every=20, init_samples=2048, **kw)  # fmt: skip
    return src, train_sae(src, tc)


# topk, batchtopk and relu: test_saelens.py (round trip) and test_sae_pipeline.py (training)
@pytest.mark.parametrize("arch", ["jumprelu", "matryoshka_batchtopk"])
def test_new_kinds_train_save_and_load_back_equal(tmp_path, arch):
    src, r = _toy_train(arch)
    assert r.history[-1]["loss"] < r.history[0]["loss"]
    save_sae(tmp_path / arch, r.cfg, r.params)
    raw = json.loads((tmp_path / arch / "cfg.json").read_text())
    assert raw["architecture"] == KINDS[arch].saelens
    cfg, params = load_sae(tmp_path / arch)
    assert cfg.architecture == KINDS[arch].exported_kind().name
    x = mx.array(src.batch(300, np.random.default_rng(3)))
    z1, z2 = encode(r.params, r.cfg, x), encode(params, cfg, x)
    np.testing.assert_array_equal(np.array(z1), np.array(z2))
    np.testing.assert_array_equal(np.array(decode(r.params, z1)), np.array(decode(params, z2)))
    l0 = float((np.array(z2) > 0).sum(1).mean())
    assert 0 < l0 < 32  # sparse, and not dead
    if KINDS[arch].saelens == "jumprelu" and arch != "jumprelu":
        assert raw["metadata"]["trained_as"] == arch and raw["metadata"]["batchtopk_k"] == 3
    if arch == "matryoshka_batchtopk":
        assert raw["metadata"]["matryoshka_widths"] == [2, 4, 8, 16, 32]
    if arch == "jumprelu":  # a learnt threshold per latent; the L0 penalty is what sparsifies
        t = np.array(params["threshold"])
        assert (t > 0).all() and np.ptp(t) > 0
        _, free = _toy_train(arch, l0_coefficient=0.0)
        assert r.history[-1]["l0"] < 0.9 * free.history[-1]["l0"]


def test_kind_options_are_checked_before_training():
    with pytest.raises(SAEError, match="--arch 'gated' cannot be trained"):
        TrainConfig(architecture="gated")
    with pytest.raises(SAEError, match="--jumprelu-bandwidth must be positive"):
        TrainConfig(architecture="jumprelu", jumprelu_bandwidth=0)
    src = ToyData(d_in=16, n_features=32)
    bad = TrainConfig(architecture="matryoshka_batchtopk", k=2, expansion=2, tokens=256,
                      matryoshka_widths=(8, 4))  # fmt: skip
    with pytest.raises(SAEError, match="--matryoshka-widths 8,4,32 must increase strictly"):
        train_sae(src, bad)


def test_cli_trains_the_new_kinds_with_their_options(tmp_path, acts_dir):
    from click.testing import CliRunner

    from mlxmerge.cli import cli

    r = CliRunner().invoke(cli, ["-q", "sae", "train", "--acts", str(acts_dir), "--layer", "2",
                                 "-o", str(tmp_path / "m"), "--arch", "matryoshka_batchtopk",
                                 "--matryoshka-widths", "16,64", "--k", "4", "--expansion", "2",
                                 "--tokens", "1024", "--batch-size", "256"])  # fmt: skip
    assert r.exit_code == 0, r.output
    raw = json.loads((tmp_path / "m" / "cfg.json").read_text())
    assert raw["architecture"] == "jumprelu"
    assert raw["metadata"]["matryoshka_widths"] == [16, 64, 128]
    r = CliRunner().invoke(cli, ["-q", "sae", "train", "--acts", str(acts_dir), "--layer", "2",
                                 "-o", str(tmp_path / "j"), "--arch", "jumprelu",
                                 "--l0-coefficient", "0", "--jumprelu-init-threshold", "0.5",
                                 "--tokens", "256", "--batch-size", "256", "--lr", "1e-9"])  # fmt: skip
    assert r.exit_code == 0, r.output
    t = load_file(str(tmp_path / "j" / "sae_weights.safetensors"))["threshold"]
    np.testing.assert_allclose(t, 0.5, rtol=1e-4)  # one step at lr 1e-9: still the init
    r = CliRunner().invoke(cli, ["sae", "train", "--acts", str(acts_dir), "--layer", "2", "-o",
                                 str(tmp_path / "x"), "--matryoshka-widths", "a,b"])  # fmt: skip
    assert r.exit_code == 2 and "comma list of sizes" in r.output
