import numpy as np
import pytest

from mlxmerge.abliterate.pipeline import abliterate
from mlxmerge.abliterate.search import interpolated_direction, kernel, pareto_front, trial_weights
from mlxmerge.errors import MlxmergeError


def test_kernel_is_a_tent():
    w = kernel(7, peak=1.2, position=3.0, minimum=0.2, width=2.0)
    assert w == pytest.approx([0.0, 0.2, 0.7, 1.2, 0.7, 0.2, 0.0])
    attn, mlp = trial_weights(
        {"attn_max": 1.0, "attn_pos": 0.5, "attn_min": 0.5, "attn_width": 1.0,
         "mlp_max": -0.1, "mlp_pos": 0.5, "mlp_min": 1.0, "mlp_width": 1.0}, 5, edit_layers=[1, 2, 3],
    )  # fmt: skip
    assert attn[0] == 0.0 and attn[4] == 0.0 and attn[2] == pytest.approx(1.0)
    assert mlp == [0.0] * 5  # a negative MLP peak switches MLP ablation off


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(1)
    pts = [(float(a), float(b)) for a, b in rng.integers(0, 6, size=(40, 2))]
    front = pareto_front(pts)
    for i, p in enumerate(pts):
        dominated = any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)
        assert (not dominated) == (p in [pts[j] for j in front])
    assert [pts[i] for i in front] == sorted(pts[i] for i in front)


def test_interpolated_direction_is_unit_and_hits_the_endpoints():
    diffs = np.random.default_rng(2).normal(size=(5, 3, 8))
    for t in (1.0, 1.3, 2.0):
        assert np.linalg.norm(interpolated_direction(diffs, -1, t)) == pytest.approx(1.0, abs=1e-6)
    d = diffs[2, -1] / np.linalg.norm(diffs[2, -1])
    np.testing.assert_allclose(interpolated_direction(diffs, -1, 2.0), d, atol=1e-6)


def test_search_is_deterministic_and_finds_a_front(refuser, tmp_path):
    kw = {"direction_layer": 2, "trials": 4, "seed": 3, "evaluate": False, "batch_size": 32,
          "n_val": 8, "max_tokens": 16}  # fmt: skip
    a = abliterate(refuser, tmp_path / "a", **kw)["search"]
    b = abliterate(refuser, tmp_path / "b", **kw)["search"]
    assert [(t["trial"], t["refusal_rate"]) for t in a["front"]] == [
        (t["trial"], t["refusal_rate"]) for t in b["front"]
    ]
    assert [t["params"] for t in a["all"]] == [t["params"] for t in b["all"]]
    assert len(a["all"]) == 4 and a["front"]
    with pytest.raises(MlxmergeError, match=r"--pick 99: the Pareto front has \d+ trials"):
        abliterate(refuser, tmp_path / "c", pick=99, **kw)


def test_pick_needs_trials(refuser, tmp_path):
    with pytest.raises(MlxmergeError, match="--pick chooses among search trials; give --trials"):
        abliterate(refuser, tmp_path / "o", pick=0)
