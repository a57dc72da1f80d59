"""The memory-bounded forms in ``kernels`` (``MethodSpec.blocked``) against the plain methods.

Tiny tensors span several statistics blocks (``BLOCK_ENTRIES`` patched down). The forms keep the
plain functions' op order; a compiled kernel may still contract a multiply and an add, and the
block sums group the same 1024-entry partial sums in another order, so the float32 results are
compared at float32 rounding and the bf16 outputs must be equal on (almost) every entry.
"""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.merge import registry
from mlxmerge.merge.methods import common, kernels
from mlxmerge.merge.methods.fusion import arcee_fusion, ram, ramplus_tl
from mlxmerge.merge.methods.linear import nearswap, passthrough
from mlxmerge.merge.methods.model_stock import model_stock
from mlxmerge.merge.methods.spherical import karcher, multislerp, nuslerp
from mlxmerge.merge.runner import merge


def inputs(shape, n, seed=0, sparse=False):
    """bf16 base and ``n`` fine-tune-like models (offsets of mixed signs; some entries equal the
    base when ``sparse``, as RAM's masks need)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    xs = []
    for k in range(n):
        d = 0.05 * rng.normal(size=shape).astype(np.float32) + 0.02 * (k - 1) * base
        if sparse:
            d = d * (rng.random(shape) < 0.5)
        xs.append(mx.array(base + d).astype(mx.bfloat16))
    return xs, mx.array(base).astype(mx.bfloat16)


# name: (plain fn, blocked fn, params, models, base: 'yes' / 'no' / 'both', sparse)
CASES = {
    "nearswap": (nearswap, kernels.nearswap, {"t": 0.03}, 1, "yes", False),
    "passthrough": (passthrough, kernels.passthrough, {"scale": [0.37]}, 1, "no", False),
    "model_stock": (model_stock, kernels.model_stock, {}, 2, "yes", False),
    "model_stock_3": (model_stock, kernels.model_stock, {}, 3, "yes", False),
    "model_stock_rows": (model_stock, kernels.model_stock, {"filter_wise": True}, 3, "yes", False),
    "nuslerp": (nuslerp, kernels.nuslerp, {"weight": [1.0, 0.6]}, 2, "both", False),
    "nuslerp_rows": (nuslerp, kernels.nuslerp,
                     {"weight": [0.3, 0.9], "nuslerp_flatten": False}, 2, "both", False),
    "nuslerp_columns": (nuslerp, kernels.nuslerp, {"weight": [0.5, 0.5], "nuslerp_flatten": False,
                        "nuslerp_row_wise": True}, 2, "both", False),
    "multislerp": (multislerp, kernels.multislerp, {"weight": [1.0, 0.6]}, 2, "both", False),
    "multislerp_3": (multislerp, kernels.multislerp, {"weight": [0.2, 0.5, 0.3]}, 3, "both", False),
    "karcher": (karcher, kernels.karcher, {}, 2, "no", False),
    "karcher_3": (karcher, kernels.karcher, {"weight": [1.0, 2.0, 0.5], "max_iter": 3}, 3, "no",
                  False),
    "arcee_fusion": (arcee_fusion, kernels.arcee_fusion, {}, 1, "yes", False),
    "ram": (ram, kernels.ram, {}, 3, "yes", True),
    "ram_5": (ram, kernels.ram, {"epsilon": 1e-3}, 5, "yes", True),  # per-block final kernel
    "model_stock_5": (model_stock, kernels.model_stock, {}, 5, "yes", False),
    "ramplus_tl": (ramplus_tl, kernels.ramplus_tl, {"r": 0.5, "alpha": 0.7}, 3, "yes", True),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [(300, 200), (97, 3, 50)])
def test_blocked_form_equals_the_plain_method(case, shape, monkeypatch):
    monkeypatch.setattr(
        kernels.blocks, "BLOCK_ENTRIES", 4096
    )  # 15 blocks of the (300, 200) tensors
    fn, blocked, params, n, has_base, sparse = CASES[case]
    xs, base = inputs(shape, n, sparse=sparse)
    for b in {"yes": [base], "no": [None], "both": [base, None]}[has_base]:
        b32 = None if b is None else b.astype(mx.float32)
        want = np.array(fn([x.astype(mx.float32) for x in xs], b32, **params))
        got = np.array(blocked(xs, b, mx.float32, **params))
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)
        bf16 = np.array(blocked(xs, b, mx.bfloat16, **params).astype(mx.float32))
        want16 = np.array(mx.array(want).astype(mx.bfloat16).astype(mx.float32))
        assert np.mean(bf16 == want16) >= 0.999


def test_karcher_keeps_the_plain_stopping_rule(monkeypatch):
    # max_iter 1 stops before convergence: the blocked form must stop at the same step.
    monkeypatch.setattr(kernels.blocks, "BLOCK_ENTRIES", 2048)
    rng = np.random.default_rng(4)
    # independent models (right angles) and unequal weights: several iterations to converge
    xs = [mx.array(rng.normal(size=(64, 100)).astype(np.float32)).astype(mx.bfloat16)
          for _ in range(3)]  # fmt: skip
    w = [1.0, 2.0, 0.5]
    one = np.array(karcher([x.astype(mx.float32) for x in xs], None, weight=w, max_iter=1))
    many = np.array(karcher([x.astype(mx.float32) for x in xs], None, weight=w, max_iter=10))
    assert np.abs(one - many).max() > 1e-3  # the setting matters here
    got = np.array(kernels.karcher(xs, None, mx.float32, weight=w, max_iter=1))
    np.testing.assert_allclose(got, one, rtol=1e-5, atol=1e-6 * np.abs(one).max())


@pytest.mark.parametrize("miss", [False, True])
@pytest.mark.parametrize("shape", [(400, 300), (1000,)])
def test_arcee_fusion_quantiles_from_a_sample_are_exact(shape, miss, monkeypatch):
    # the sample-and-bracket order statistics (tensors over EXACT_PARTITION_BELOW entries)
    monkeypatch.setattr(common, "EXACT_PARTITION_BELOW", 500)
    monkeypatch.setattr(common, "SAMPLE_SIZE", 2000)
    monkeypatch.setattr(kernels.blocks, "BLOCK_ENTRIES", 4096)
    if miss:  # brackets that hold none of the ranks: the fallback must give the same values
        monkeypatch.setattr(kernels.fusion, "kth_bracket", lambda sample, k, n: (-2.0, -1.0))
    rng = np.random.default_rng(1)
    base = rng.normal(size=shape).astype(np.float32)
    x = mx.array(base + 0.3 * rng.normal(size=shape).astype(np.float32)).astype(mx.bfloat16)
    b = mx.array(base).astype(mx.bfloat16)
    want = np.array(arcee_fusion([x.astype(mx.float32)], b.astype(mx.float32)))
    got = np.array(kernels.arcee_fusion([x], b, mx.float32))
    # the same mask, entry for entry: the values are either the base's or the model's
    np.testing.assert_array_equal(got, want)


def test_unsupported_inputs_fall_back_to_the_plain_method():
    xs, base = inputs((8, 8), 2)
    assert kernels.nearswap(xs, base, mx.float32, t=0.1) is None  # two models: plain raises
    assert kernels.model_stock(xs[:1], base, mx.float32) is None
    assert kernels.nuslerp(xs[:1], None, mx.float32, weight=[1.0]) is None
    one_d = [x.reshape(-1) for x in xs]
    assert kernels.nuslerp(one_d, None, mx.float32, weight=[1, 1], nuslerp_flatten=False) is None


RECIPES = {
    "model_stock": {"base_model": "base", "models": ["model_a", "model_b"]},
    "karcher": {"models": ["model_a", "model_b"]},
    "multislerp": {"models": ["model_a", "model_b"], "weight": [1.0, 0.4]},
    "nuslerp": {"base_model": "base", "models": ["model_a", "model_b"], "weight": [1.0, 0.4]},
    "nearswap": {"base_model": "base", "models": ["model_a"], "parameters": {"t": 0.001}},
    "ram": {"base_model": "base", "models": ["model_a", "model_b"]},
    "arcee_fusion": {"base_model": "base", "models": ["model_a"]},
    "passthrough": {"models": ["model_a"], "weight": None, "scale": [0.5]},
}


def _recipe(method, family):
    spec = RECIPES[method]
    models = []
    for k in spec["models"]:
        p = {key: spec[key][len(models)] for key in ("weight", "scale") if spec.get(key)}
        models.append({"model": str(family[k]), **({"parameters": p} if p else {})})
    recipe = {"merge_method": method, "dtype": "bfloat16", "models": models,
              "parameters": spec.get("parameters", {})}  # fmt: skip
    if "base_model" in spec:
        recipe["base_model"] = str(family[spec["base_model"]])
    return recipe


@pytest.mark.parametrize("method", list(RECIPES))
def test_runner_uses_the_blocked_form_with_the_same_result(family, tmp_path, monkeypatch, method):
    from mlxmerge.io import open_checkpoint

    recipe = _recipe(method, family)
    spec = registry.METHODS[method]
    monkeypatch.setitem(registry.METHODS, method, dataclasses.replace(spec, blocked=None))
    plain = merge(recipe, tmp_path / "plain")
    calls = []
    counted = lambda *a, **k: calls.append(1) or spec.blocked(*a, **k)
    monkeypatch.setitem(registry.METHODS, method, dataclasses.replace(spec, blocked=counted))
    monkeypatch.setattr(kernels.blocks, "BLOCK_ENTRIES", 2048)
    fast = merge(recipe, tmp_path / "blocked")
    assert calls
    want, got = open_checkpoint(plain), open_checkpoint(fast)
    assert sorted(want.names()) == sorted(got.names())
    for name in want.names():
        a, b = np.array(want.get(name, mx.float32)), np.array(got.get(name, mx.float32))
        assert np.mean(a == b) >= 0.999, name
