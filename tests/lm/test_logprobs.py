"""Log-softmax, cross-entropy, KL and ensembles against numpy formulas written here."""

import mlx.core as mx
import numpy as np

from mlxmerge.lm.logprobs import cross_entropy, ensemble_log_probs, kl_divergence, log_softmax


def _np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_cross_entropy_and_kl_match_numpy():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((3, 5, 11)) * 4).astype(np.float32)
    b = (rng.standard_normal((3, 5, 11)) * 4).astype(np.float32)
    t = rng.integers(0, 11, (3, 5))
    la, lb = _np_log_softmax(a), _np_log_softmax(b)
    ce = -np.take_along_axis(la, t[..., None], -1)[..., 0]
    kl = (np.exp(la) * (la - lb)).sum(-1)
    np.testing.assert_allclose(np.array(cross_entropy(mx.array(a), mx.array(t))), ce, rtol=1e-5)
    np.testing.assert_allclose(np.array(kl_divergence(mx.array(a), mx.array(b))), kl, atol=1e-5)
    np.testing.assert_allclose(np.array(kl_divergence(mx.array(a), mx.array(a))), 0, atol=1e-6)
    # bfloat16 logits are upcast before the softmax
    np.testing.assert_allclose(
        np.array(log_softmax(mx.array(a).astype(mx.bfloat16))),
        _np_log_softmax(np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32))),
        atol=1e-5,
    )


def test_ensemble_is_the_log_of_the_mean_probability():
    rng = np.random.default_rng(1)
    outs = [rng.standard_normal((2, 7)).astype(np.float32) for _ in range(3)]
    want = np.log(np.mean([np.exp(_np_log_softmax(o)) for o in outs], axis=0))
    got = np.array(ensemble_log_probs([mx.array(o) for o in outs]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(
        np.array(ensemble_log_probs([mx.array(outs[0])])), _np_log_softmax(outs[0]), atol=1e-5
    )
