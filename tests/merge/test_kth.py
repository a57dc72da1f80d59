"""The sampled k-th value bracket agrees with a full sort on tensors above the exact cutoff."""

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.merge.methods.common import EXACT_PARTITION_BELOW, kth_largest, top_k_mask

N = EXACT_PARTITION_BELOW + 12345


@pytest.mark.parametrize("k", [1, 7, N // 5, N // 2, N - 3, N])
def test_kth_largest_matches_sort(k):
    x = np.random.default_rng(k).standard_normal(N).astype(np.float32)
    assert kth_largest(mx.array(x), k) == np.sort(x)[::-1][k - 1]


@pytest.mark.parametrize("k", [1, N // 3, N - 1])
def test_heavy_ties_keep_exactly_k(k):
    x = np.random.default_rng(0).integers(0, 4, N).astype(np.float32)
    assert kth_largest(mx.array(x), k) == np.sort(x)[::-1][k - 1]
    mask = np.array(top_k_mask(mx.array(x), k))
    assert mask.sum() == k
    # ties at the threshold are kept in row-major order, like a stable descending sort
    order = np.argsort(-x, kind="stable")[:k]
    assert np.array_equal(np.flatnonzero(mask), np.sort(order))
