"""Row-blocked task arithmetic / TIES / DARE / breadcrumbs / DELLA equal the whole-tensor
computation bit for bit."""

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.merge.methods import block_stats, row_blocks
from mlxmerge.merge.methods.sparsify import derive_key
from mlxmerge.merge.methods.task_arithmetic import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    task_arithmetic,
    ties,
)
from mlxmerge.merge.runner import merge


def inputs(shape, n=2, seed=0, dtype=mx.bfloat16, integer=False):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    if integer:  # many equal |δ|: ties at the top-k threshold
        xs = [base + rng.integers(-3, 4, size=shape).astype(np.float32) for _ in range(n)]
    else:
        xs = [base + 0.01 * rng.standard_t(3, size=shape).astype(np.float32) for _ in range(n)]
    return [mx.array(x).astype(dtype) for x in xs], mx.array(base).astype(dtype)


CASES = {
    "task_arithmetic": {"weight": [0.7, 0.5]},
    "ties": {"weight": [1.0, 0.6], "density": [0.4, 0.7]},
    "dare_ties": {"weight": [1.0, 0.6], "density": 0.5},
    "dare_linear": {"weight": [0.5, 0.5], "density": [0.3, 0.9]},
    "dare_inverse_p": {"weight": [0.5, 0.5], "density": 0.4, "rescale_mode": "inverse_p"},
    "ties_model_scope": {"weight": [1.0, 1.0], "density": 0.5, "trim_scope": "model",
                         "trim_thresholds": [0.01, 0.02]},
    "ties_rescale_l1": {"weight": [1.0, 0.6], "density": [0.4, 0.7], "rescale": True},
    "ties_rescale_inverse_p": {"weight": [1.0, 0.6], "density": 0.3, "rescale": True,
                               "rescale_mode": "inverse_p"},
    "breadcrumbs": {"weight": [0.7, 0.5], "density": [0.4, 0.8], "gamma": [0.01, 0.05]},
    "breadcrumbs_ties": {"weight": [1.0, 0.6], "density": 0.5, "gamma": 0.02},
    "breadcrumbs_no_outliers": {"weight": [1.0, 1.0], "density": [0.9, 0.5], "gamma": [0.2, 0.0]},
    "breadcrumbs_l1": {"weight": [1.0, 1.0], "density": 0.6, "gamma": 0.1, "rescale": True},
    "breadcrumbs_nothing": {"weight": [1.0, 1.0], "density": [0.0, 0.0], "gamma": [1.0, 0.0]},
    "della": {"weight": [1.0, 0.6], "density": [0.4, 0.7], "epsilon": [0.1, 0.2]},
    "della_linear": {"weight": [0.5, 0.5], "density": 0.5, "epsilon": 0.3},
    "della_inverse_p": {"weight": [0.5, 0.5], "density": 0.5, "epsilon": 0.2,
                        "rescale_mode": "inverse_p"},
    "della_no_rescale": {"weight": [1.0, 1.0], "density": [0.6, 0.0], "rescale": False},
}  # fmt: skip
FNS = {"task_arithmetic": task_arithmetic, "ties": ties, "dare_ties": dare_ties,
       "dare_linear": dare_linear, "ties_model_scope": ties, "dare_inverse_p": dare_linear,
       "ties_rescale_l1": ties, "ties_rescale_inverse_p": ties, "breadcrumbs": breadcrumbs,
       "breadcrumbs_ties": breadcrumbs_ties, "breadcrumbs_no_outliers": breadcrumbs,
       "breadcrumbs_l1": breadcrumbs_ties, "breadcrumbs_nothing": breadcrumbs, "della": della,
       "della_linear": della_linear, "della_inverse_p": della, "della_no_rescale": della}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [(300, 200), (97, 4, 64)])  # several blocks each
def test_blocked_equals_whole_tensor(case, shape):
    fn = FNS[case]
    params = CASES[case]
    xs, base = inputs(shape)
    keys = [derive_key(3, "t", i) for i in range(2)]
    want = fn([x.astype(mx.float32) for x in xs], base.astype(mx.float32), **params, keys=keys)
    got = row_blocks.merge_rows(
        xs, base, mx.float32, **{**fn.keywords, **params}, keys=keys, block_entries=5000
    )
    np.testing.assert_array_equal(np.array(got), np.array(want))


@pytest.mark.parametrize("fn", [ties, breadcrumbs])
@pytest.mark.parametrize("rescale", [False, True])
def test_blocked_top_k_breaks_ties_in_row_major_order(fn, rescale):
    xs, base = inputs((256, 64), integer=True, dtype=mx.float32)
    params = {"weight": [1.0, 1.0], "density": [0.37, 0.61], "rescale": rescale}
    if fn is breadcrumbs:  # the outlier threshold falls among equal |δ| as well
        params["gamma"] = [0.13, 0.05]
    want = fn(xs, base, **params)
    kw = {**fn.keywords, **params}
    got = row_blocks.merge_rows(xs, base, mx.float32, **kw, block_entries=1024)
    np.testing.assert_array_equal(np.array(got), np.array(want))


def test_unsupported_settings_use_the_whole_tensor_path():
    big = (4096, 1024)
    assert row_blocks.supported(ties, {}, big)
    assert not row_blocks.supported(ties, {"elect": "unweighted"}, big)
    assert row_blocks.supported(della, {}, big)
    assert row_blocks.supported(ties, {"rescale": True}, big)
    assert not row_blocks.supported(ties, {}, (64, 64))  # small: no need


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_runner_blocks_large_tensors_with_the_same_bytes(family, tmp_path, monkeypatch, method):
    recipe = {"merge_method": method, "base_model": str(family["base"]), "dtype": "bfloat16",
              "models": [{"model": str(family["base"])}] + [
                  {"model": str(family[k]), "parameters": {"weight": 1.0, "density": 0.5}}
                  for k in ("model_a", "model_b")]}  # fmt: skip
    whole = merge(recipe, tmp_path / "whole")
    monkeypatch.setattr(row_blocks, "MIN_ENTRIES", 4096)  # the 64-wide family's big tensors
    monkeypatch.setattr(row_blocks, "BLOCK_ENTRIES", 2048)
    calls = []
    real = row_blocks.merge_rows
    monkeypatch.setattr(row_blocks, "merge_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    blocked = merge(recipe, tmp_path / "blocked")
    assert calls
    for f in sorted(whole.glob("*.safetensors")):
        assert f.read_bytes() == (blocked / f.name).read_bytes()


def test_bernoulli_from_its_bits_block_by_block_is_mx_random_bernoulli():
    shape, key = (512, 300), derive_key(5, "t", 0)
    bits = block_stats.bernoulli_bits(shape, key)
    # p·upper at the draw itself (never kept) and one float32 step above it (always kept): a
    # uniform draw compared with p gets half of these wrong
    edge = np.array(bits.astype(mx.float32) / block_stats._BERNOULLI_UPPER)
    odd = np.arange(edge.size).reshape(shape) % 2 == 1
    on_edge = mx.array(np.where(odd, np.nextafter(edge, np.float32(1)), edge))
    for p in (mx.random.uniform(shape=shape, key=mx.random.key(1)), on_edge, mx.array(0.3)):
        want = mx.random.bernoulli(p, shape, key=key)
        pb = mx.broadcast_to(p, shape)
        got = mx.concatenate(
            [
                block_stats.bernoulli_of_bits(bits[r : r + 100], pb[r : r + 100])
                for r in range(0, 512, 100)
            ]
        )
        assert 0 < int(mx.sum(want).item()) < want.size
        np.testing.assert_array_equal(np.array(got), np.array(want))


@pytest.mark.parametrize("shape", [(1024, 896), (300, 4864), (200, 1000)])
def test_block_sums_finish_as_the_whole_tensor_sum(shape):
    """Per-block level-1 sums finished by fsum equal fsum of the whole tensor: bit for bit when
    the blocks hold whole 65,536-entry chunks (896 and 4864 columns), else to float32 rounding;
    and both match a float64 sum."""
    from mlxmerge.merge.methods.common import fsum

    a = mx.array(np.random.default_rng(1).standard_t(3, size=shape).astype(np.float32))
    rows, cols = shape
    spans = block_stats.block_spans(rows, cols, 1 << 17)
    assert len(spans) > 1 and spans[-1][1] == rows
    parts = [block_stats.level1(a[r0:r1]) for r0, r1 in spans]
    got, want = block_stats.finish_fsum(parts).item(), fsum(a).item()
    exact = float(np.sum(np.array(a), dtype=np.float64))
    if (spans[0][1] * cols) % (1 << 16) == 0:
        assert got == want
    assert abs(got - exact) <= 1e-5 * np.abs(np.array(a)).sum()
    assert abs(want - exact) <= 1e-5 * np.abs(np.array(a)).sum()


def test_inputs_let_through_with_inf_give_the_plain_result(family, tmp_path, monkeypatch):
    """--allow-nonfinite: an Inf that DARE drops stays dropped (the blocked form's mask products
    would make it 0·Inf = NaN, so such a tensor takes the plain path)."""
    import shutil

    from mlxmerge.merge.methods.sparsify import random_mask

    src = tmp_path / "inf_model"
    shutil.copytree(family["model_b"], src)
    (f,) = sorted(src.glob("*.safetensors"))
    weights = dict(mx.load(str(f)))
    name = next(k for k, v in weights.items() if v.ndim == 2 and v.size >= 4096)
    drop = np.flatnonzero(
        np.array(random_mask(0.3, weights[name].shape, derive_key(0, name, 1))) == 0
    )
    flat = np.array(weights[name].astype(mx.float32)).reshape(-1)
    flat[drop[0]] = np.inf
    weights[name] = mx.array(flat.reshape(weights[name].shape)).astype(weights[name].dtype)
    mx.save_safetensors(str(f), weights, metadata={"format": "mlx"})
    recipe = {"merge_method": "dare_linear", "base_model": str(family["base"]), "dtype": "bfloat16",
              "parameters": {"rescale": False},
              "models": [{"model": str(family["model_a"]), "parameters": {"weight": 1.0, "density": 0.3}},
                         {"model": str(src), "parameters": {"weight": 1.0, "density": 0.3}}]}  # fmt: skip
    plain = merge(recipe, tmp_path / "plain", allow_nonfinite=True)
    monkeypatch.setattr(row_blocks, "MIN_ENTRIES", 4096)
    monkeypatch.setattr(row_blocks, "BLOCK_ENTRIES", 2048)
    blocked = merge(recipe, tmp_path / "blocked", allow_nonfinite=True)
    out = mx.load(str(blocked / f.name))
    assert not np.isnan(np.array(out[name].astype(mx.float32))).any()
    for g in sorted(plain.glob("*.safetensors")):
        assert g.read_bytes() == (blocked / g.name).read_bytes()
