"""Row-blocked SCE equals the whole-tensor ``sce`` bit for bit, directly and through the runner."""

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.merge.methods import row_blocks, sce_rows
from mlxmerge.merge.methods.task_arithmetic import sce
from mlxmerge.merge.runner import merge


def inputs(shape, n=2, seed=0, integer=False):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    if integer:  # many equal variances: ties at the top-k threshold, and zero variances
        xs = [base + rng.integers(-2, 3, size=shape).astype(np.float32) for _ in range(n)]
    else:
        xs = [base + 0.01 * rng.standard_t(3, size=shape).astype(np.float32) for _ in range(n)]
    return [mx.array(x).astype(mx.bfloat16) for x in xs], mx.array(base).astype(mx.bfloat16)


@pytest.mark.parametrize("select_topk", [1.0, 0.37, 0.0])
@pytest.mark.parametrize("shape", [(300, 200), (97, 4, 64)])  # several blocks each
@pytest.mark.parametrize("n_models", [2, 3])
def test_blocked_sce_equals_whole_tensor(select_topk, shape, n_models, monkeypatch):
    monkeypatch.setattr(row_blocks, "MIN_ENTRIES", 1)
    xs, base = inputs(shape, n_models)
    want = sce([x.astype(mx.float32) for x in xs], base.astype(mx.float32), select_topk=select_topk)
    got = sce_rows.blocked(xs, base, mx.float32, select_topk=select_topk, block_entries=5000)
    np.testing.assert_array_equal(np.array(got), np.array(want))


def test_blocked_sce_breaks_variance_ties_in_row_major_order(monkeypatch):
    monkeypatch.setattr(row_blocks, "MIN_ENTRIES", 1)
    xs, base = inputs((256, 64), 2, integer=True)
    want = sce([x.astype(mx.float32) for x in xs], base.astype(mx.float32), select_topk=0.43)
    got = sce_rows.blocked(xs, base, mx.float32, select_topk=0.43, block_entries=1024)
    np.testing.assert_array_equal(np.array(got), np.array(want))


def test_a_missed_variance_bracket_falls_back_to_exact_ranking(monkeypatch):
    monkeypatch.setattr(row_blocks, "MIN_ENTRIES", 1)
    monkeypatch.setattr(sce_rows, "kth_bracket", lambda *a: (0.0, 0.0))  # nothing in the band
    xs, base = inputs((300, 200), 2)
    want = sce([x.astype(mx.float32) for x in xs], base.astype(mx.float32), select_topk=0.3)
    got = sce_rows.blocked(xs, base, mx.float32, select_topk=0.3, block_entries=5000)
    np.testing.assert_array_equal(np.array(got), np.array(want))


def test_small_or_invalid_settings_use_the_whole_tensor_path():
    xs, base = inputs((64, 64))
    assert sce_rows.blocked(xs, base, mx.float32) is None  # small: no need
    big = [mx.zeros((4096, 1024), mx.bfloat16)] * 2
    assert sce_rows.blocked(big, big[0], mx.float32, select_topk=1.5) is None  # sce raises


def test_runner_blocks_sce_with_the_same_bytes(family, tmp_path, monkeypatch):
    recipe = {"merge_method": "sce", "base_model": str(family["base"]), "dtype": "bfloat16",
              "parameters": {"select_topk": 0.5},
              "models": [{"model": str(family[k])} for k in ("base", "model_a", "model_b")]}  # fmt: skip
    whole = merge(recipe, tmp_path / "whole")
    monkeypatch.setattr(row_blocks, "MIN_ENTRIES", 4096)  # the 64-wide family's big tensors
    monkeypatch.setattr(row_blocks, "BLOCK_ENTRIES", 2048)
    calls = []
    real = sce_rows.block_spans  # called once per blocked tensor
    monkeypatch.setattr(sce_rows, "block_spans", lambda *a: calls.append(1) or real(*a))
    blocked = merge(recipe, tmp_path / "blocked")
    assert calls
    for f in sorted(whole.glob("*.safetensors")):
        assert f.read_bytes() == (blocked / f.name).read_bytes()
