"""SAE math: exact top-k, sparse backward against dense autodiff, decoder norms, AuxK, toy recovery."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.demo.toy_sae import ToyData
from mlxmerge.sae.metrics import ReconstructionStats, mcc, mmcs
from mlxmerge.sae.model import (
    SAEConfig,
    SAEError,
    decode_sparse,
    encode,
    init_params,
    select_topk,
    topk_indices,
)
from mlxmerge.sae.train import TrainConfig, Trainer, geometric_median, train_sae


def test_topk_exactly_k_even_with_ties():
    cfg = SAEConfig(d_in=8, d_sae=32, k=5)
    params = init_params(cfg)
    params["encoder"] = mx.ones((32, 8))  # every latent gets the same pre-activation
    x = mx.abs(mx.random.normal((16, 8), key=mx.random.key(1))) + 0.1
    z = np.array(encode(params, cfg, x))
    assert ((z > 0).sum(axis=1) == 5).all()
    idx = np.array(topk_indices(mx.array(np.ones((4, 32), np.float32)), 7))
    assert all(len(set(row)) == 7 for row in idx)


def test_topk_selects_the_largest():
    pre = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32)
    idx = np.array(topk_indices(mx.array(pre), 4))
    expected = np.sort(np.argsort(-pre, axis=1)[:, :4], axis=1)
    assert (np.sort(idx, axis=1) == expected).all()


def test_sparse_backward_matches_dense_autodiff():
    cfg = SAEConfig(d_in=16, d_sae=64, k=4)
    p = init_params(cfg, seed=2)
    p["b_dec"] = mx.random.normal((16,), key=mx.random.key(3))
    p["b_enc"] = 0.1 * mx.random.normal((64,), key=mx.random.key(4))
    x = mx.random.normal((10, 16), key=mx.random.key(5))

    def sparse(p):
        xc = x - p["b_dec"]
        idx, v = select_topk(p, xc, xc @ p["encoder"].T + p["b_enc"], 4)
        return ((decode_sparse(p["W_dec"], v, idx) + p["b_dec"] - x) ** 2).sum()

    def dense(p):  # the naive version: dense latents, dense decoder matmul
        pre = (x - p["b_dec"]) @ p["encoder"].T + p["b_enc"]
        idx = mx.argsort(-mx.stop_gradient(pre), axis=-1)[:, :4]
        v = mx.maximum(mx.take_along_axis(pre, idx, axis=-1), 0)
        z = mx.put_along_axis(mx.zeros_like(pre), idx, v, axis=-1)
        return ((z @ p["W_dec"] + p["b_dec"] - x) ** 2).sum()

    l1, g1 = mx.value_and_grad(sparse)(p)
    l2, g2 = mx.value_and_grad(dense)(p)
    assert abs(l1.item() - l2.item()) < 1e-3
    for name in g1:
        np.testing.assert_allclose(np.array(g1[name]), np.array(g2[name]), atol=1e-4, rtol=1e-4)


def _trainer(d_in=16, d_sae=64, k=4, **kw):
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    tc = TrainConfig(k=k, d_sae=d_sae, batch_size=128, tokens=128 * 10, **kw)
    sample = np.random.default_rng(0).standard_normal((512, d_in)).astype(np.float32)
    return Trainer(cfg, tc, sample, steps=10)


def test_decoder_rows_unit_norm_after_a_step():
    tr = _trainer()
    x = mx.random.normal((128, 16), key=mx.random.key(7))
    out = tr.step(x)
    mx.eval(out, tr.params)
    norms = np.linalg.norm(np.array(tr.params["W_dec"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_auxk_gradient_reaches_only_dead_latents():
    tr = _trainer()
    dead = np.zeros(64, bool)
    dead[[3, 10, 11, 40, 63]] = True
    x = mx.random.normal((128, 16), key=mx.random.key(8)) * tr.scale
    e = mx.random.normal((128, 16), key=mx.random.key(9))

    def aux(params):
        xc = x - params["b_dec"]
        pre = xc @ params["encoder"].T + params["b_enc"]
        return tr._auxk(params, xc, pre, e, mx.array(dead), 4)

    loss, grads = mx.value_and_grad(aux)(tr.params)
    assert loss.item() > 0
    for name in ("encoder", "W_dec"):
        rows = np.abs(np.array(grads[name])).sum(axis=1) > 0
        assert rows[dead].any() and not rows[~dead].any(), name
    assert not (np.abs(np.array(grads["b_enc"]))[~dead] > 0).any()


def test_auxk_turns_on_with_dead_latents():
    tr = _trainer(dead_tokens=128)
    tr.stats["since_fired"] = mx.where(mx.arange(64) < 8, 1e9, 0.0)
    *_, aux = tr.step(mx.random.normal((128, 16), key=mx.random.key(3)))
    assert aux.item() > 0 and 8 in [k for k in tr._steps if k]


def test_geometric_median_against_weiszfeld_reference():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((200, 3)), 100 + rng.standard_normal((20, 3))])
    m = np.array(geometric_median(mx.array(x.astype(np.float32))))
    # the geometric median minimises the sum of distances: no small step improves it
    cost = lambda c: np.linalg.norm(x - c, axis=1).sum()
    for step in np.eye(3) * 1e-2:
        assert cost(m) <= cost(m + step) + 1e-3 and cost(m) <= cost(m - step) + 1e-3
    assert np.linalg.norm(m) < 2  # robust to the 10% outliers, unlike the mean (~9)


def test_reconstruction_stats_against_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)) * 3 + 5
    x_hat = x + rng.standard_normal((300, 8)) * 0.5
    z = np.maximum(rng.standard_normal((300, 20)), 0)
    stats = ReconstructionStats(8, 20)
    for i in range(0, 300, 70):  # batches of uneven size
        stats.add(mx.array(x[i : i + 70]), mx.array(x_hat[i : i + 70]), mx.array(z[i : i + 70]))
    r = stats.result()
    mu = x.mean(axis=0)
    fvu = ((x - x_hat) ** 2).sum() / ((x - mu) ** 2).sum()
    legacy = np.mean(1 - ((x - x_hat) ** 2).sum(1) / ((x - mu) ** 2).sum(1))
    assert r["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert r["explained_variance"] == pytest.approx(1 - fvu, rel=1e-5)
    assert r["explained_variance_legacy"] == pytest.approx(legacy, rel=1e-4)
    assert r["l0"] == pytest.approx((z > 0).sum(1).mean())
    assert r["dead_fraction"] == pytest.approx(((z > 1e-3).sum(0) == 0).mean())


def test_mmcs_and_mcc():
    g = np.random.default_rng(2).standard_normal((10, 6))
    perm = np.random.default_rng(3).permutation(10)
    assert mmcs(g, -g[perm] * 0 + g[perm] * 2) == pytest.approx(1.0)
    assert mcc(g, g[perm]) == pytest.approx(1.0)
    # Hungarian matching against brute force over all 720 one-to-one matchings of 6 x 6
    import itertools

    from mlxmerge.sae.metrics import cosine_matrix

    learned = np.random.default_rng(4).standard_normal((6, 6))
    c = np.abs(cosine_matrix(g[:6], learned))
    best = max(c[range(6), list(p)].mean() for p in itertools.permutations(range(6)))
    assert mcc(g[:6], learned) == pytest.approx(best)
    dup = np.concatenate([g[:5], g[:5]])  # half the truth, twice: MMCS is fooled, MCC is not
    assert mcc(g, dup) < 0.95 and mmcs(g[:5], dup) == pytest.approx(1.0)


def test_bad_config_is_an_error():
    with pytest.raises(SAEError, match="k=40 must be between 1 and d_sae=32"):
        SAEConfig(d_in=8, d_sae=32, k=40)
    with pytest.raises(SAEError, match="architecture 'gated'"):
        SAEConfig(d_in=8, d_sae=32, architecture="gated")
    with pytest.raises(SAEError, match="k=100 is larger than d_sae=64"):
        train_sae(ToyData(d_in=32, n_features=16), TrainConfig(k=100, expansion=2, tokens=256))


def test_loss_falls_and_toy_features_are_recovered():
    """A small Sharkey-style ground truth: 64 features in 32 dims, ~3 active, 2x expansion."""
    src = ToyData(d_in=32, n_features=64, mean_active=3.0, seed=0)
    tc = TrainConfig(k=3, expansion=2, tokens=512 * 300, batch_size=512, lr=3e-3, log_every=50)
    r = train_sae(src, tc)
    assert r.history[-1]["loss"] < 0.5 * r.history[0]["loss"]
    x = src.batch(4096, np.random.default_rng(9))
    z = np.array(encode(r.params, r.cfg, mx.array(x)))
    assert mmcs(src.features, np.array(r.params["W_dec"])) > 0.9
    assert ((z > 1e-3).sum(axis=0) == 0).mean() < 0.05
