"""The compiled, memory-bounded linear and SLERP (``kernels.linear``/``kernels.slerp``) against
the plain float32 methods, a float64 NumPy reference and through the runner."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.merge import registry
from mlxmerge.merge.methods import kernels, linear, slerp
from mlxmerge.merge.runner import merge


def tensors(shape, n, seed=0, dtype=mx.bfloat16):
    rng = np.random.default_rng(seed)
    return [mx.array(rng.normal(size=shape).astype(np.float32)).astype(dtype) for _ in range(n)]


def f32(x):
    return np.array(x.astype(mx.float32))


@pytest.mark.parametrize("shape", [(300, 200), (97, 3, 50)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("out", [mx.bfloat16, mx.float16, mx.float32])
def test_linear_kernel_equals_the_plain_method(shape, normalize, out):
    xs = tensors(shape, 3)
    w = [0.3, 0.5, 0.45]
    want = linear([x.astype(mx.float32) for x in xs], weight=w, normalize=normalize).astype(out)
    got = kernels.linear(xs, None, out, weight=w, normalize=normalize)
    assert got.dtype == out
    np.testing.assert_array_equal(f32(got), f32(want))


def test_norms_and_dot_match_float64_across_blocks(monkeypatch):
    monkeypatch.setattr(kernels.blocks, "BLOCK_ENTRIES", 4096)  # 15 blocks, the last one partial
    a, b = tensors((251, 233), 2, seed=1)
    n0, n1, d = kernels.norms_and_dot(a, b)
    a64, b64 = f32(a).astype(np.float64), f32(b).astype(np.float64)
    np.testing.assert_allclose(n0.item(), np.linalg.norm(a64), rtol=1e-6)
    np.testing.assert_allclose(n1.item(), np.linalg.norm(b64), rtol=1e-6)
    np.testing.assert_allclose(d.item(), (a64 * b64).sum(), rtol=1e-5, atol=1e-3)


def numpy_slerp(a, b, t):
    """Shoemake's formula in float64 with mergekit's colinear fallback (reference)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(np.clip(cos, -1, 1))
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("same", [False, True])
def test_slerp_kernel_matches_the_plain_method_and_float64(monkeypatch, t, same):
    monkeypatch.setattr(kernels.blocks, "BLOCK_ENTRIES", 8192)
    a, b = tensors((300, 200), 2, seed=2)
    if same:  # colinear: the plain path's lerp fallback
        b = a
    got = kernels.slerp([b], a, mx.float32, t=t)
    want = slerp([b.astype(mx.float32)], a.astype(mx.float32), t=t)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(got), numpy_slerp(f32(a), f32(b), t), rtol=1e-4, atol=1e-5)
    # in bf16 the two paths agree on all but float32-rounding-boundary entries
    g16, w16 = f32(got.astype(mx.bfloat16)), f32(want.astype(mx.bfloat16))
    assert np.mean(g16 == w16) > 0.999


def test_blocked_forms_hold_no_float32_copy_of_a_whole_tensor(monkeypatch):
    monkeypatch.setattr(kernels.blocks, "BLOCK_ENTRIES", 1 << 16)
    a, b = tensors((2048, 1024), 2, seed=3)  # 4 MB each in bf16; 8 MB in float32
    mx.eval(a, b)
    for run in (
        lambda: kernels.linear([a, b], None, mx.bfloat16, weight=[0.5, 0.5]),
        lambda: kernels.slerp([b], a, mx.bfloat16, t=0.4),
    ):
        run()  # compile first
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        run()
        extra = mx.get_peak_memory() - base
        # the bf16 output (4 MB) plus block temporaries; a float32 copy would add 8 MB
        assert extra < 4 * 2**20 + 3 * 4 * (1 << 16) * 2 + 2**20, extra


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_runner_output_with_and_without_the_blocked_form(family, tmp_path, monkeypatch, method):
    a, b = str(family["model_a"]), str(family["model_b"])
    if method == "linear":
        recipe = {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.4}}]}  # fmt: skip
    else:
        recipe = {"merge_method": "slerp", "base_model": a, "dtype": "bfloat16",
                  "models": [{"model": a}, {"model": b}], "parameters": {"t": 0.35}}  # fmt: skip
    calls = []
    spec = registry.METHODS[method]
    real = spec.blocked
    monkeypatch.setitem(registry.METHODS, method, dataclasses.replace(
        spec, blocked=lambda *x, **k: calls.append(1) or real(*x, **k)))  # fmt: skip
    fast = merge(recipe, tmp_path / "fast")
    assert calls  # the blocked form ran
    monkeypatch.setitem(registry.METHODS, method, dataclasses.replace(spec, blocked=None))
    plain = merge(recipe, tmp_path / "plain")
    for f in sorted(plain.glob("*.safetensors")):
        if method == "linear":  # same operations: same bytes
            assert f.read_bytes() == (fast / f.name).read_bytes()
            continue
        want, got = mx.load(str(f)), mx.load(str(fast / f.name))
        assert want.keys() == got.keys()
        for k in want:  # bf16 bits: equal but for float32 rounding boundaries (1 ulp)
            w = np.array(want[k].view(mx.int16)).astype(int)
            g = np.array(got[k].view(mx.int16)).astype(int)
            assert np.abs(w - g).max() <= 1, k
