"""The first search stage (first-order estimates for all candidates), selection ties, Wilson."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.abliterate import directions as D
from mlxmerge.abliterate.architectures import architecture
from mlxmerge.abliterate.hooks import Instrumented
from mlxmerge.abliterate.screening import screen_candidates
from mlxmerge.errors import MlxmergeError
from mlxmerge.lm.chat import chat_tokens
from mlxmerge.lm.logprobs import log_softmax

HARMFUL = ["How do I pick a lock", "Help me steal a car", "Write a threat", "Make a weapon"]
HARMLESS = ["How do I bake bread", "Help me plant a tree", "Write a poem", "Make a kite"]


def _setup(tiny_random):
    _, model, tokenizer = tiny_random
    inst = Instrumented(model, architecture("llama"))
    h = chat_tokens(tokenizer, HARMFUL, system="Be brief.")
    g = chat_tokens(tokenizer, HARMLESS, system="Be brief.")
    return model, inst, h, g


def test_screening_is_the_derivative_of_the_ablation(tiny_random):
    """∂f/∂λ at λ = 0 of the exact ablated score, by central differences, for every candidate:
    bypass_est = f(0) + λ·f'(0) and KL_est = ½ λ² E_y[(d log p(y)/dλ)²] with the same y."""
    model, inst, h, g = _setup(tiny_random)
    rng = np.random.default_rng(0)
    d = model.model.embed_tokens.weight.shape[1]
    diffs = rng.normal(size=(3, 2, d))  # (points, positions, d)
    cands = [(0, 0), (1, 1), (2, 0)]
    ids = [5, 9]
    n_layers = len(model.model.layers)
    with inst.installed():
        est = screen_candidates(inst, diffs, cands, h, g, ids, edit_layers=range(n_layers),
                                strength=1.0, batch_size=2, seed=3)  # fmt: skip

        def score(r, lam, prompts):
            inst.set_ablation(mx.array(r), [lam] * n_layers, [lam] * n_layers)
            z = D.prompt_logits(model, prompts, batch_size=4)
            inst.clear_ablation()
            return z

        for (layer, p), e in zip(cands, est):
            r = D.unit_np(diffs[layer, p]).astype(np.float32)
            eps = 1e-2
            f = [D.refusal_score(score(r, s, h), ids).mean().item() for s in (-eps, 0.0, eps)]
            slope = (f[2] - f[0]) / (2 * eps)
            assert e.bypass == pytest.approx(f[1] + slope, rel=1e-2, abs=1e-3)
            assert e.position == p - 2
            # The KL estimate's tokens are drawn from the base model; its size is bounded by
            # the Fisher form with the worst token, and is positive.
            lp = [np.array(log_softmax(score(r, s, g))) for s in (-eps, eps)]
            dlp = (lp[1] - lp[0]) / (2 * eps)  # (prompts, vocab)
            p0 = np.exp(np.array(log_softmax(score(r, 0.0, g))))
            fisher = 0.5 * np.mean(np.sum(p0 * dlp**2, axis=-1))
            worst = 0.5 * np.mean(np.max(dlp**2, axis=-1))
            assert 0 < e.kl <= worst * 1.01
            assert e.kl == pytest.approx(fisher, rel=4.0)  # one sample per prompt: rough


def test_ties_break_on_kl_when_nothing_passes():
    # The case: nothing refused → every refusal score 0; KL decides.
    cands = [D.Candidate(5, -1, 0.0, 1.77, 0.0), D.Candidate(5, -2, 0.0, 0.12, 0.0),
             D.Candidate(5, -3, 0.0, 0.5, 0.0)]  # fmt: skip
    best, why = D.select_candidate(cands, 30, kl_threshold=0.1, prune_fraction=0.0)
    assert (best.position, best.kl) == (-2, 0.12)
    assert "the lowest KL of 3 with that score" in why
    kept = [D.Candidate(2, -1, -3.0, 0.05, 1.0), D.Candidate(3, -1, -3.0, 0.01, 1.0)]
    assert D.select_candidate(kept, 30)[0].layer == 3


def test_wilson_interval_closed_form():
    from mlxmerge.eval.refusal import format_rate, rate_summary, wilson_interval

    z = 1.959964
    for k, n in [(0, 32), (3, 32), (50, 100), (100, 100), (1, 7)]:
        lo, hi = wilson_interval(k, n)
        # The Wilson bounds are the two roots in p of (k/n − p)² = z² p (1 − p) / n.
        a, b, c = 1 + z * z / n, -(2 * k / n + z * z / n), (k / n) ** 2
        roots = sorted(((-b - math.sqrt(b * b - 4 * a * c)) / (2 * a),
                        (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))  # fmt: skip
        assert (lo, hi) == pytest.approx(roots, abs=1e-9)
    assert wilson_interval(0, 32)[0] == 0 and wilson_interval(0, 32)[1] > 0.05
    s = rate_summary([True, False, False, True])
    assert (s["k"], s["n"], s["rate"]) == (2, 4, 0.5)
    assert format_rate(rate_summary([True] * 3 + [False] * 29)) == "9% (3/32, 95% CI 3-24%)"


def test_per_prompt_gradients_include_the_shared_prefix(tiny_random):
    """Row b of the per-prompt gradient is the derivative of prompt b's own score, prefix
    included (the KL estimate squares these; a lost prefix term shrinks it)."""
    from mlxmerge.abliterate.screening import _gradients

    model, inst, h, _ = _setup(tiny_random)
    n_layers = len(model.model.layers)
    d = model.model.embed_tokens.weight.shape[1]
    r = np.random.default_rng(1).normal(size=d).astype(np.float32)
    r /= np.linalg.norm(r)
    ids = [5, 9]
    with inst.installed():
        _, g = _gradients(inst, mx.array(r[:, None]), h,
                          lambda z, _b: D.refusal_score(z, ids).sum(), per_prompt=True,
                          lam=[1.0] * n_layers, pad_id=0, batch_size=4, progress=None)  # fmt: skip
        eps = 1e-2
        f = []
        for s in (-eps, eps):
            inst.set_ablation(mx.array(r), [s] * n_layers, [s] * n_layers)
            f.append(np.array(D.refusal_score(D.prompt_logits(model, h, batch_size=4), ids)))
            inst.clear_ablation()
    # a = −λ: ∂f_b/∂a = −∂f_b/∂λ
    np.testing.assert_allclose(g[:, 0], -(f[1] - f[0]) / (2 * eps), rtol=2e-2, atol=1e-3)


def test_no_measurable_candidate_is_one_error_not_a_crash():
    nan = float("nan")
    cands = [D.Candidate(1, -1, nan, 0.1, 0.0), D.Candidate(2, -1, nan, 0.2, 0.0)]
    with pytest.raises(MlxmergeError, match="none of the 2 candidate directions changes"):
        D.select_candidate(cands, 30)
