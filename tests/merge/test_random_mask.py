"""DARE's counter-based keep mask (``sparsify.random_mask``): the distribution it must have."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.merge.methods import sparsify as sp


def mask(p, n, key):
    return np.array(sp.random_mask(p, (n,), key))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_keep_fraction_is_binomial(p):
    n = 1 << 20
    kept = mask(p, n, sp.derive_key(0, "w", 0)).sum()
    assert abs(kept - p * n) < 5 * math.sqrt(n * p * (1 - p))


def test_neighbours_models_and_seeds_are_independent():
    p, n = 0.5, 1 << 20
    a = mask(p, n, sp.derive_key(0, "w", 0)).astype(float)
    others = [mask(p, n, sp.derive_key(0, "w", 1)), mask(p, n, sp.derive_key(1, "w", 0)),
              mask(p, n, sp.derive_key(0, "v", 0))]  # fmt: skip
    tol = 5 / math.sqrt(n)  # correlations of independent fair coins: ~N(0, 1/n)
    for lag in (1, 2, 64, 2048):  # neighbours in a row, and in a column of a 2048-wide matrix
        assert abs(np.corrcoef(a[:-lag], a[lag:])[0, 1]) < tol
    for b in others:
        assert abs(np.corrcoef(a, b.astype(float))[0, 1]) < tol


def test_blocks_and_offsets_give_the_same_entries(monkeypatch):
    key = sp.derive_key(3, "w", 1)
    whole = mask(0.4, 100_000, key)
    monkeypatch.setattr(sp, "MASK_BLOCK", 4096)  # many kernel calls, a ragged last one
    np.testing.assert_array_equal(mask(0.4, 100_000, key), whole)
    np.testing.assert_array_equal(np.array(sp.mask_entries(0.4, key, 777, 54_321)),
                                  whole[777:54_321])  # fmt: skip


def test_indices_past_2_to_the_32_do_not_repeat():
    key = sp.derive_key(0, "w", 0)
    low = np.array(sp.mask_entries(0.5, key, 0, 1 << 16))
    high = np.array(sp.mask_entries(0.5, key, 1 << 32, (1 << 32) + (1 << 16)))
    assert 0.4 < np.mean(low == high) < 0.6  # unrelated, not the same 65536 draws


def test_extreme_densities():
    key = sp.derive_key(0, "w", 0)
    assert not mask(0.0, 10_000, key).any()
    assert mask(1.0 - 2**-25, 10_000, key).all()  # rounds to every 24-bit value
    assert sp.random_mask(0.5, (3, 0), key).shape == (3, 0)
    assert sp.random_mask(0.5, (7, 3), key).dtype == mx.uint8  # 1 = kept
