"""arcee_fusion and RAM against numpy transcriptions of mergekit 0.1.5's formulas."""

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.errors import RecipeError
from mlxmerge.merge.registry import call_method


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_fusion(a, b):
    p, q = _softmax(b) + 1e-8, _softmax(a) + 1e-8
    imp = np.abs(b - a) * (p * np.log(p / q)).sum(-1, keepdims=True)
    s = np.sort(imp.reshape(-1))
    q1, med, q3 = (s[int(np.float32(f) * np.float32(s.size - 1))] for f in (0.25, 0.5, 0.75))
    return a + (b - a) * (imp >= med + 1.5 * (q3 - q1))


@pytest.mark.parametrize("shape", [(17, 24), (40,)])
def test_arcee_fusion_matches_reference(shape):
    rng = np.random.default_rng(0)
    a = rng.normal(size=shape).astype(np.float32)
    b = (a + rng.normal(size=shape) * rng.uniform(0, 1, size=shape)).astype(np.float32)
    got = np.array(call_method("arcee_fusion", [mx.array(b)], mx.array(a), {}))
    want = np_fusion(a, b)
    taken = got != a
    assert 0 < taken.mean() < 0.5  # a real threshold: some entries taken, most not
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_arcee_fusion_needs_exactly_one_other_model():
    x = mx.zeros((2, 3))
    with pytest.raises(RecipeError, match="exactly one model besides the base"):
        call_method("arcee_fusion", [x, x], x, {})


def test_ram_unique_kept_shared_averaged():
    base = np.zeros(6, np.float32)
    x1 = np.array([1.0, 0.0, 2.0, 1e-6, 4.0, 0.0], np.float32)
    x2 = np.array([0.0, 3.0, 4.0, 0.0, -2.0, 0.0], np.float32)
    x3 = np.array([0.0, 0.0, 6.0, 0.0, 0.0, 0.0], np.float32)
    got = call_method("ram", [mx.array(v) for v in (x1, x2, x3)], mx.array(base), {})
    # entry 2: three contributors, mean 4; entry 3 is below epsilon: dropped
    np.testing.assert_allclose(np.array(got), [1.0, 3.0, 4.0, 0.0, 1.0, 0.0], rtol=1e-6)


def test_ramplus_scales_unique_entries_by_overlap_ratio():
    base = np.ones(4, np.float32)
    x1 = base + np.array([1.0, 2.0, 0.0, 0.0], np.float32)  # unique: entry 0; shared: entry 1
    x2 = base + np.array([0.0, 4.0, 3.0, 5.0], np.float32)  # unique: 2 and 3; shared: 1
    got = call_method("ramplus_tl", [mx.array(x1), mx.array(x2)], mx.array(base),
                      {"r": 0.5, "alpha": 0.8})  # fmt: skip
    lam1 = 1 + 0.5 * min(1 / 1, 0.8)
    lam2 = 1 + 0.5 * min(1 / 2, 0.8)
    want = base + np.array([1.0 * lam1, 3.0, 3.0 * lam2, 5.0 * lam2])
    np.testing.assert_allclose(np.array(got), want, rtol=1e-6)
