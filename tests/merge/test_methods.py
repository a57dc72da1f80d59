"""Merge methods against plain numpy implementations of mergekit's maths, plus identities."""

import hashlib  # noqa: I001  (mlxmerge must be imported before mlx.core)
import itertools

import mlxmerge  # noqa: F401  (loads BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.errors import RecipeError
from mlxmerge.merge import methods as m
from mlxmerge.merge.methods import sparsify
from mlxmerge.merge.methods.common import fsum, top_k_mask
from mlxmerge.merge.registry import METHODS, REQUIRED, call_method, check_params, get_method

SHAPES = [(37,), (6, 10), (3, 4, 5)]
RNG = np.random.default_rng(0)


def rand(shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def mxa(x):
    return mx.array(x)


def npy(x):
    return np.array(x, dtype=np.float64)


def close(a, b, rtol=1e-4, atol=1e-5):
    np.testing.assert_allclose(npy(a), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def family(shape, n, spread=0.1):
    """A base and n fine-tunes that differ from it by small deltas (like real task vectors)."""
    base = rand(shape)
    return base, [base + rand(shape, spread) for _ in range(n)]


# ---------------------------------------------------------------- numpy references (mergekit)


def np_slerp(t, v0, v1, eps=1e-8):
    v0, v1 = v0.astype(np.float64), v1.astype(np.float64)
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = np.sum(u0 * u1)
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    th = np.arccos(dot)
    return np.sin(th - th * t) / np.sin(th) * v0 + np.sin(th * t) / np.sin(th) * v1


def np_nuslerp(t, v0, v1, row_wise=False, flatten=True):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-7)

    cos = np.sum(unit(v0) * unit(v1), axis=-1, keepdims=True)
    th = np.arccos(np.clip(cos, -1, 1))
    res = (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th)
    lin = np.abs(np.sin(th)) < 1e-8
    res = np.where(lin, (1 - t) * v0 + t * v1, res)
    if row_wise and not flatten:
        res = np.swapaxes(res, 0, -1)
    return res.reshape(shape)


def np_multislerp(xs, w, base=None, eps=1e-8):
    x = np.stack([v.reshape(-1) for v in xs]).astype(np.float64)
    if base is not None:
        x = x - base.reshape(-1)
    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / (norms + eps)
    mean = (u * w[:, None]).sum(0)
    mean /= np.linalg.norm(mean)
    tan = u - (u @ mean)[:, None] * mean
    tr = (tan * w[:, None]).sum(0)
    tn = np.linalg.norm(tr) + eps
    res = (mean * np.cos(tn) + tr * np.sin(tn) / tn) * (norms[:, 0] * w).sum()
    res = res.reshape(xs[0].shape)
    return res if base is None else res + base


def np_karcher(xs, w, max_iter=10, tol=1e-5):
    a = np.asarray(w, dtype=np.float64) / np.sum(w)
    x = [v.reshape(-1).astype(np.float64) for v in xs]
    norms = [np.linalg.norm(v) for v in x]
    units = [v / n for v, n in zip(x, norms)]
    u = sum(ai * ui for ai, ui in zip(a, units))
    u /= np.linalg.norm(u)
    for _ in range(max_iter):
        T = np.zeros_like(u)
        for ai, ui in zip(a, units):
            c = np.clip(u @ ui, -1, 1)
            th = np.arccos(c)
            if th >= tol:
                T += ai * th / np.sin(th) * (ui - c * u)
        nt = np.linalg.norm(T)
        if nt < tol:
            break
        u = np.cos(nt) * u + np.sin(nt) * T / nt
        u /= np.linalg.norm(u)
    return (sum(ai * ni for ai, ni in zip(a, norms)) * u).reshape(xs[0].shape)


def np_topk(d, k):
    """Mask of the k largest |d| (stable: equal values keep the lower flat index)."""
    flat = np.abs(d).reshape(-1)
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, bool)
    mask[order[:k]] = True
    return mask.reshape(d.shape)


def np_magnitude(d, density):
    if density >= 1:
        return d
    return d * np_topk(d, int(density * d.size))


def np_breadcrumbs(d, density, gamma):
    """mergekit's magnitude_outliers with its sort: keep ascending-order indices [n_bot, n - n_top)."""
    if density >= 1:
        return d
    n = d.size
    n_top = int(gamma * n)
    n_bot = n - int(density * n) - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = np.argsort(np.abs(d).reshape(-1), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[n_bot : n - n_top]] = True
    return d * mask.reshape(d.shape)


def np_l1_rescale(d, mask):
    masked = d * mask
    before, after = np.abs(d).sum(), np.abs(masked).sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * before / after


def np_della_p(d, density, eps):
    rows = d.reshape(1, -1) if d.ndim < 2 else d.reshape(d.shape[0], -1)
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1), axis=1) + 1
    n = rows.shape[1]
    p = (density - eps) + (ranks - 1) / (n - 1) * 2 * eps
    return p.reshape(d.shape)


def np_gta(xs, base, w, deltas=None, consensus=False, normalize=False, lam=1.0, paper=False):
    """mergekit GTATask after sparsification; ``paper``: unweighted elect + count mean."""
    d = np.stack([x - base for x in xs] if deltas is None else deltas).astype(np.float64)
    wa = np.asarray(w, dtype=np.float64).reshape((-1,) + (1,) * base.ndim)
    wd = d * wa
    if consensus:
        if paper:
            s = np.sign(d.sum(0))
            s[s == 0] = 1 if np.sign(s).sum() >= 0 else -1
            mask = np.sign(d) == s
        else:
            s = np.where(wd.sum(0) >= 0, 1, -1)
            mask = np.sign(wd) == s
        mix = (wd * mask).sum(0)
        div = mask.sum(0).astype(np.float64) if paper else (wa * mask).sum(0)
        div[div == 0] = 1
    else:
        mix = wd.sum(0)
        div = wa.sum()
        div = 1 if abs(div) < 1e-8 else div
    if normalize:
        mix = mix / div
    return base + lam * mix


# ---------------------------------------------------------------- linear, passthrough, nearswap


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_numpy(shape, normalize):
    xs, w = [rand(shape) for _ in range(3)], [0.2, 0.5, 1.3]
    ref = sum(wi * x for wi, x in zip(w, xs)) / (sum(w) if normalize else 1)
    close(m.linear([mxa(x) for x in xs], None, weight=w, normalize=normalize), ref)


def test_linear_weights_one_zero_returns_first():
    a, b = rand((5, 7)), rand((5, 7))
    out = m.linear([mxa(a), mxa(b)], None, weight=[1.0, 0.0])
    np.testing.assert_array_equal(np.array(out), a)


def test_linear_zero_weight_sum_is_an_error():
    with pytest.raises(RecipeError, match="sum to 0.*normalize: false"):
        m.linear([mxa(rand(3)), mxa(rand(3))], None, weight=[1.0, -1.0])


def test_passthrough_scale():
    a = rand((4, 6))
    np.testing.assert_array_equal(np.array(m.passthrough([mxa(a)], None)), a)
    close(m.passthrough([mxa(a)], None, scale=[0.5]), 0.5 * a, rtol=0, atol=0)
    with pytest.raises(RecipeError, match="exactly one model"):
        m.passthrough([mxa(a), mxa(a)], None)


@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap_matches_numpy(shape):
    a, b = rand(shape), rand(shape)
    t = 0.4
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    close(m.nearswap([mxa(b)], mxa(a), t=t), w * b + (1 - w) * a)


def test_nearswap_identities():
    a = rand((8, 8))
    b = a + np.where(rand((8, 8)) > 0, 0.01, 5.0).astype(np.float32)
    out = np.array(m.nearswap([mxa(b)], mxa(a), t=0.1))
    near = np.abs(a - b) <= 0.1
    np.testing.assert_allclose(out[near], b[near])  # within t: the other model's value
    # beyond t: move exactly t from the base towards the other model
    np.testing.assert_allclose(out[~near] - a[~near], 0.1 * np.sign(b - a)[~near], atol=1e-5)
    np.testing.assert_allclose(np.array(m.nearswap([mxa(b)], mxa(a), t=0.0)), a)


# ---------------------------------------------------------------- slerp family


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_slerp_matches_numpy(shape, t):
    a, b = rand(shape), rand(shape)
    close(m.slerp([mxa(b)], mxa(a), t=t), np_slerp(t, a, b))


def test_slerp_endpoints_are_exact():
    a, b = rand((9, 4)), rand((9, 4))
    np.testing.assert_array_equal(np.array(m.slerp([mxa(b)], mxa(a), t=0.0)), a)
    np.testing.assert_allclose(np.array(m.slerp([mxa(b)], mxa(a), t=1.0)), b, rtol=1e-6)


def test_slerp_midpoint_of_orthogonal_equal_norm_keeps_norm():
    a = np.zeros(64, np.float32)
    b = np.zeros(64, np.float32)
    a[0], b[1] = 3.0, 3.0
    out = np.array(m.slerp([mxa(b)], mxa(a), t=0.5))
    assert np.linalg.norm(out) == pytest.approx(3.0, rel=1e-6)
    np.testing.assert_allclose(out[:2], [3 / np.sqrt(2)] * 2, rtol=1e-6)


def test_slerp_near_colinear_is_lerp():
    a = rand((6, 6))
    b = 2.5 * a + rand((6, 6), 1e-4)
    close(m.slerp([mxa(b)], mxa(a), t=0.3), 0.7 * a + 0.3 * b)


@pytest.mark.parametrize(
    "pair", ["colinear", "antiparallel", "zero_base", "zero_both", "tiny"], ids=str
)
def test_slerp_degenerate_inputs_are_finite(pair):
    a = rand((5, 5))
    b = {
        "colinear": 2 * a,
        "antiparallel": -a,
        "zero_base": a,
        "zero_both": np.zeros_like(a),
        "tiny": a * 1e-12,
    }[pair]
    if pair.startswith("zero"):
        a = np.zeros_like(a)
    for t in (0.0, 0.5, 1.0):
        out = np.array(m.slerp([mxa(b)], mxa(a), t=t))
        assert np.all(np.isfinite(out))
        close(out, np_slerp(t, a, b))


@pytest.mark.parametrize("t", [-0.1, 1.5, "half"])
def test_slerp_t_out_of_range(t):
    with pytest.raises(RecipeError, match="'t' must lie in \\[0, 1\\]"):
        m.slerp([mxa(rand(3))], mxa(rand(3)), t=t)


@pytest.mark.parametrize("shape", [(37,), (6, 10)])
@pytest.mark.parametrize("mode", ["flat", "rows", "cols"])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_numpy(shape, mode, with_base):
    base, (a, b) = family(shape, 2, spread=1.0)
    w = [0.3, 0.9]
    kw = {"nuslerp_flatten": mode == "flat", "nuslerp_row_wise": mode == "cols"}
    out = m.nuslerp([mxa(a), mxa(b)], mxa(base) if with_base else None, weight=w, **kw)
    t = 0.9 / 1.2
    if with_base:
        ref = base + np_nuslerp(t, a - base, b - base, mode == "cols", mode == "flat")
    else:
        ref = np_nuslerp(t, a, b, mode == "cols", mode == "flat")
    close(out, ref)


def test_nuslerp_equals_slerp_when_not_colinear():
    a, b = rand((6, 10)), rand((6, 10))
    close(m.nuslerp([mxa(a), mxa(b)], None, weight=[3, 1]), np_slerp(0.25, a, b))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_matches_numpy(shape, with_base):
    base, xs = family(shape, 3, spread=1.0)
    w = [0.2, 0.3, 0.5]
    out = m.multislerp([mxa(x) for x in xs], mxa(base) if with_base else None, weight=w)
    close(out, np_multislerp(xs, w, base if with_base else None))


def test_multislerp_antipodal_pair_falls_back_to_lerp_and_three_raise():
    a = rand(16)
    close(m.multislerp([mxa(a), mxa(-a)], None, weight=[1, 1]), np.zeros(16))
    c = rand(16)
    with pytest.raises(RecipeError, match="weighted mean of the unit tensors is zero"):
        m.multislerp([mxa(a), mxa(-a), mxa(c), mxa(-c)], None, weight=[1, 1, 1, 1])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w", [None, [1.0, 2.0, 0.5]])
def test_karcher_matches_numpy(shape, w):
    xs = [rand(shape) + 1.0 for _ in range(3)]
    out = m.karcher([mxa(x) for x in xs], None, weight=w, max_iter=20)
    close(out, np_karcher(xs, [1, 1, 1] if w is None else w, max_iter=20))


def test_karcher_weights_matter_and_identical_inputs_are_returned():
    a, b = rand(20), rand(20)
    out = np.array(m.karcher([mxa(a), mxa(b)], None, weight=[1.0, 0.0]))
    close(out, a)
    out = m.karcher([mxa(a), mxa(a)], None)
    close(out, a)


# ---------------------------------------------------------------- task-vector family


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_numpy(shape, normalize):
    base, xs = family(shape, 3)
    w = [0.5, 1.0, -0.3]
    out = m.task_arithmetic(
        [mxa(x) for x in xs], mxa(base), weight=w, normalize=normalize, lambda_=0.8
    )
    close(out, np_gta(xs, base, w, normalize=normalize, lam=0.8))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("paper", [False, True])
def test_ties_matches_numpy(shape, density, paper):
    base, xs = family(shape, 3)
    w, dens = [0.7, 1.0, 0.4], [density, density, min(1.0, density + 0.1)]
    deltas = [np_magnitude(x - base, d) for x, d in zip(xs, dens)]
    kw = {"elect": "unweighted", "disjoint_mean": "count"} if paper else {}
    out = m.ties([mxa(x) for x in xs], mxa(base), weight=w, density=dens, lambda_=1.2, **kw)
    close(out, np_gta(xs, base, w, deltas, consensus=True, normalize=True, lam=1.2, paper=paper))


def test_ties_one_model_density_one_equals_task_arithmetic():
    base, (x,) = family((6, 10), 1)
    ties = m.ties([mxa(x)], mxa(base), weight=[1.0], density=[1.0])
    ta = m.task_arithmetic([mxa(x)], mxa(base), weight=[1.0])
    close(ties, np.array(ta), rtol=1e-6, atol=1e-6)
    close(ties, x, rtol=1e-6, atol=1e-6)


def test_ties_normalize_makes_weight_scale_irrelevant():
    base, xs = family((6, 10), 3)
    args = ([mxa(x) for x in xs], mxa(base))
    a = m.ties(*args, weight=[0.5, 0.5, 0.5], density=0.5)
    b = m.ties(*args, weight=[1.0, 1.0, 1.0], density=0.5)
    close(a, np.array(b), rtol=1e-6, atol=1e-6)
    # With the paper's count-based disjoint mean the weight scale shows through.
    c = m.ties(*args, weight=[0.5] * 3, density=0.5, disjoint_mean="count")
    d = m.ties(*args, weight=[1.0] * 3, density=0.5, disjoint_mean="count")
    close(np.array(c) - base, 0.5 * (np.array(d) - base), rtol=1e-5, atol=1e-6)


def test_ties_sign_election_is_weighted():
    base = np.zeros(1, np.float32)
    xs = [np.array([1.0], np.float32), np.array([-0.6], np.float32), np.array([-0.6], np.float32)]
    args = ([mxa(x) for x in xs], mxa(base))
    # weighted: 3·1 − 0.6 − 0.6 > 0 → +; unweighted: 1 − 1.2 < 0 → −
    assert np.array(m.ties(*args, weight=[3, 1, 1]))[0] == pytest.approx(1.0)
    assert np.array(m.ties(*args, weight=[3, 1, 1], elect="unweighted"))[0] == pytest.approx(-0.6)


def test_ties_zero_sum_sign():
    base = np.zeros(3, np.float32)
    xs = [np.array([-2.0, -1.0, 1.0], np.float32), np.array([-1.0, -3.0, -1.0], np.float32)]
    args = ([mxa(x) for x in xs], mxa(base))
    # mergekit: a zero sum elects +1; the paper: the majority of the elected signs (here −1)
    np.testing.assert_allclose(np.array(m.ties(*args, weight=[1, 1])), [-1.5, -2.0, 1.0])
    out = m.ties(*args, weight=[1, 1], elect="unweighted", disjoint_mean="count")
    np.testing.assert_allclose(np.array(out), [-1.5, -2.0, -1.0])


def test_magnitude_trim_keeps_exactly_k_with_ties():
    x = mx.array([1.0, 3.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    for k in range(8):
        mask = np.array(top_k_mask(x, k))
        assert mask.sum() == k
        np.testing.assert_array_equal(mask, np_topk(np.array(x), k))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0), (0.2, 0.01)])
@pytest.mark.parametrize("consensus", [False, True])
def test_breadcrumbs_matches_numpy(shape, density, gamma, consensus):
    base, xs = family(shape, 2)
    w = [1.0, 0.6]
    fn = m.breadcrumbs_ties if consensus else m.breadcrumbs
    out = fn([mxa(x) for x in xs], mxa(base), weight=w, density=density, gamma=gamma)
    deltas = [np_breadcrumbs(x - base, density, gamma) for x in xs]
    if gamma * base.size < 1:  # mergekit zeroes everything here; we keep the top density
        deltas = [np_magnitude(x - base, density) for x in xs]
    close(out, np_gta(xs, base, w, deltas, consensus=consensus))


def test_breadcrumbs_drops_outliers_and_small():
    base = np.zeros(100, np.float32)
    x = np.arange(1, 101, dtype=np.float32)
    out = np.array(m.breadcrumbs([mxa(x)], mxa(base), weight=[1.0], density=0.5, gamma=0.1))
    np.testing.assert_array_equal(np.nonzero(out)[0], np.arange(40, 90))


def _bernoulli_np(p, shape, key):
    if not np.isscalar(p):  # DELLA's per-entry probabilities: MLX's uniform draw
        return np.array(mx.random.bernoulli(mx.array(p), shape, key=key))
    return _hash_mask_np(p, shape, key)


def _fmix32_np(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _hash_mask_np(p, shape, key):
    """DARE's keep mask written out in NumPy: MurmurHash3's finalizer, twice, of each entry's
    flat index and the key's two words; kept when the top 24 bits < round(p·2^24)."""
    s0, s1 = np.array(key).astype(np.uint32)
    i = np.arange(int(np.prod(shape)), dtype=np.uint32)
    with np.errstate(over="ignore"):
        h = _fmix32_np(_fmix32_np(i ^ s0) ^ s1)
    return ((h >> np.uint32(8)) < np.uint32(round(p * 2**24))).reshape(shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("mode", ["l1", "inverse_p"])
def test_dare_matches_numpy_with_same_mask(shape, method, mode):
    base, xs = family(shape, 2)
    w, dens = [1.0, 0.5], [0.4, 0.7]
    keys = [m.derive_key(7, "model.layers.0.mlp.up_proj.weight", i) for i in range(2)]
    out = getattr(m, method)(
        [mxa(x) for x in xs], mxa(base), weight=w, density=dens, keys=keys, rescale_mode=mode
    )
    deltas = []
    for x, d, k in zip(xs, dens, keys):
        mask = _bernoulli_np(d, shape, k)
        delta = x - base
        deltas.append(np_l1_rescale(delta, mask) if mode == "l1" else delta * mask / d)
    close(out, np_gta(xs, base, w, deltas, consensus=method == "dare_ties"))


def test_dare_reproducible_and_key_dependent():
    base, (x,) = family((64, 64), 1)
    key = m.derive_key(0, "w", 0)

    def run(k):
        return np.array(m.dare_linear([mxa(x)], mxa(base), weight=[1.0], density=0.3, keys=[k]))

    np.testing.assert_array_equal(run(key), run(m.derive_key(0, "w", 0)))
    assert not np.array_equal(run(key), run(m.derive_key(1, "w", 0)))
    assert not np.array_equal(run(key), run(m.derive_key(0, "w", 1)))


def test_dare_l1_rescale_keeps_l1_norm_and_density():
    base = np.zeros((200, 500), np.float32)
    x = rand((200, 500))
    out = np.array(
        m.dare_linear(
            [mxa(x)], mxa(base), weight=[1.0], density=0.3, keys=[m.derive_key(1, "a", 0)]
        )
    )
    assert (out != 0).mean() == pytest.approx(0.3, abs=0.01)
    assert np.abs(out).sum() == pytest.approx(np.abs(x).sum(), rel=1e-4)


def test_dare_inverse_p_keeps_expected_sum():
    base = np.zeros((200, 500), np.float32)
    x = np.abs(rand((200, 500))) + 0.5
    out = np.array(
        m.dare_linear(
            [mxa(x)],
            mxa(base),
            weight=[1.0],
            density=0.3,
            rescale_mode="inverse_p",
            keys=[m.derive_key(2, "a", 0)],
        )
    )
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / 0.3, rtol=1e-6)
    assert out.sum() == pytest.approx(x.sum(), rel=0.03)  # ~6 standard deviations


def test_derive_key_is_blake2b_of_seed_name_index():
    h = hashlib.blake2b(b"42\x00model.embed_tokens.weight\x003", digest_size=8).digest()
    v = int.from_bytes(h, "little")
    expected = [v >> 32, v & 0xFFFFFFFF]
    key = m.derive_key(42, "model.embed_tokens.weight", 3)
    assert np.array(key).tolist() == expected


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("mode", ["l1", "inverse_p"])
def test_della_matches_numpy_with_same_mask(shape, method, mode):
    base, xs = family(shape, 2)
    w, dens, eps = [1.0, 0.8], [0.5, 0.6], [0.2, 0.1]
    keys = [m.derive_key(3, "t", i) for i in range(2)]
    out = getattr(m, method)(
        [mxa(x) for x in xs],
        mxa(base),
        weight=w,
        density=dens,
        epsilon=eps,
        keys=keys,
        rescale_mode=mode,
    )
    deltas = []
    for x, d, e, k in zip(xs, dens, eps, keys):
        delta = x - base
        p = np_della_p(delta, d, e)
        mask = _bernoulli_np(p.astype(np.float32), shape, k)
        deltas.append(np_l1_rescale(delta, mask) if mode == "l1" else delta * mask / p)
    close(
        out,
        np_gta(xs, base, w, deltas, consensus=method == "della", normalize=method == "della"),
    )


@pytest.mark.parametrize("shape", [(37, 50), (5, 1), (3, 1025)])
def test_row_ranks_are_a_stable_sort_per_row(shape, monkeypatch):
    monkeypatch.setattr(sparsify, "RANK_CHUNK", 100)  # several chunks of rows
    rng = np.random.default_rng(0)
    a = np.abs(rng.integers(-4, 5, size=shape)).astype(np.float32) * 0.25  # ties and zeros
    a[:, ::7] = 1e-30  # tiny values rank above the zeros
    order = np.argsort(a, axis=1, kind="stable")
    want = np.empty(shape, np.float32)
    np.put_along_axis(want, order, np.arange(shape[1], dtype=np.float32)[None], axis=1)
    np.testing.assert_array_equal(np.array(sparsify.row_ranks(mx.array(a))), want)


def test_della_keeps_large_entries_more_often():
    base = np.zeros((50, 400), np.float32)
    x = np.tile(np.linspace(0.01, 1, 400, dtype=np.float32), (50, 1))
    out = np.array(
        m.della_linear(
            [mxa(x)],
            mxa(base),
            weight=[1.0],
            density=0.5,
            epsilon=0.4,
            keys=[m.derive_key(0, "x", 0)],
        )
    )
    kept = (out != 0).mean(axis=0)
    assert kept[:100].mean() == pytest.approx(0.2, abs=0.05)  # p from 0.1 to 0.3
    assert kept[-100:].mean() == pytest.approx(0.8, abs=0.05)  # p from 0.7 to 0.9


def test_della_epsilon_window_is_checked():
    base, (x,) = family((4, 4), 1)
    with pytest.raises(RecipeError, match="density ± epsilon must lie in \\(0, 1\\)"):
        m.della(
            [mxa(x)],
            mxa(base),
            weight=[1],
            density=0.9,
            epsilon=0.15,
            keys=[m.derive_key(0, "x", 0)],
        )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("topk", [1.0, 0.4])
def test_sce_matches_numpy(shape, topk):
    base, xs = family(shape, 3)
    tv = np.stack([x - base for x in xs]).astype(np.float64)
    if topk < 1:
        var = tv.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        tv = tv * np_topk(var, k)
    wt = (tv.reshape(3, -1) ** 2).mean(1)
    wt = (wt / wt.sum()).reshape((-1,) + (1,) * base.ndim)
    mask = np.sign(tv) == np.where(tv.sum(0) >= 0, 1, -1)
    ref = base + (tv * wt * mask).sum(0) / np.maximum((wt * mask).sum(0), 1e-6)
    close(m.sce([mxa(x) for x in xs], mxa(base), select_topk=topk), ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_numpy(shape, filter_wise):
    base = rand(shape)
    common = rand(shape, 0.1)  # a shared direction so the offsets' cosines are positive
    xs = [base + common + rand(shape, 0.1) for _ in range(3)]
    w0 = base.reshape(1, -1) if (filter_wise and base.ndim < 2) else base
    if not filter_wise:
        w0 = base.reshape(-1)
    offs = [x.reshape(w0.shape) - w0 for x in xs]
    cos = []
    for i, j in itertools.combinations(range(3), 2):
        num = (offs[i] * offs[j]).sum(-1)
        den = np.linalg.norm(offs[i], axis=-1) * np.linalg.norm(offs[j], axis=-1)
        cos.append(np.clip(num / np.maximum(den, 1e-6), -1, 1))
    c = np.clip(np.mean(cos, axis=0), 0, 1)[..., None]
    t = 3 * c / (1 + 2 * c)
    avg = sum(x.reshape(w0.shape) for x in xs) / 3
    ref = (t * avg + (1 - t) * w0).reshape(shape)
    close(m.model_stock([mxa(x) for x in xs], mxa(base), filter_wise=filter_wise), ref)


def test_model_stock_identical_models_and_base():
    base, (x,) = family((6, 10), 1)
    close(m.model_stock([mxa(x), mxa(x)], mxa(base)), x)
    close(m.model_stock([mxa(base), mxa(base)], mxa(base)), base)
    with pytest.raises(RecipeError, match="at least two other models"):
        m.model_stock([mxa(x)], mxa(base))


# ---------------------------------------------------------------- registry


def test_registry_defaults_match_mergekit():
    expect = {  # (normalize, rescale) from mergekit's registry.py
        "task_arithmetic": (False, False),
        "ties": (True, False),
        "dare_ties": (False, True),
        "dare_linear": (False, True),
        "breadcrumbs": (False, False),
        "breadcrumbs_ties": (False, False),
        "della": (True, True),
        "della_linear": (False, True),
    }
    for name, (normalize, rescale) in expect.items():
        g = METHODS[name].global_params
        assert (g["normalize"], g["rescale"], g["lambda"]) == (normalize, rescale, 1.0), name
        assert METHODS[name].tensor_params["weight"] is REQUIRED
        assert METHODS[name].tensor_params["density"] == 1.0
        assert METHODS[name].base == "required"
    assert METHODS["breadcrumbs"].tensor_params["gamma"] == 0.01
    assert METHODS["della"].tensor_params["epsilon"] == 0.15
    assert METHODS["slerp"].global_params["t"] is REQUIRED
    assert {n for n, s in METHODS.items() if s.random} == {
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
    }
    assert {n for n, s in METHODS.items() if s.embed_rectify == "common"} >= {
        "linear",
        "slerp",
        "nuslerp",
        "model_stock",
        "karcher",
    }
    for spec in METHODS.values():
        assert spec.paper and spec.summary


def test_unknown_method_suggests_closest():
    with pytest.raises(
        RecipeError, match="Unknown merge method 'dare-ties'.*Did you mean 'dare_ties'"
    ):
        get_method("dare-ties")
    with pytest.raises(RecipeError, match="Did you mean 'slerp'"):
        get_method("slurp")


def test_unknown_param_lists_accepted():
    with pytest.raises(
        RecipeError,
        match="models\\[1\\].parameters: unknown parameter 'densty'.*Did you mean 'density'.*"
        "Accepted: .*weight",
    ):
        check_params("ties", {"weight": 1.0, "densty": 0.5}, "models[1].parameters")
    with pytest.raises(RecipeError, match="It is a global parameter"):
        check_params("ties", {"normalize": True}, "models[0].parameters", scope="model")


def test_check_params_required_and_values():
    check_params("ties", {"weight": [0.1, 0.5], "density": 0.5}, "models[0]")
    check_params(
        "ties", {"density": [{"filter": "mlp", "value": 0.3}, {"value": 1}]}, "p", scope="global"
    )
    with pytest.raises(RecipeError, match="requires parameter 'weight'"):
        check_params("ties", {"density": 0.5}, "models[0]")
    with pytest.raises(RecipeError, match="requires parameter 't'"):
        check_params("slerp", {}, "parameters")
    with pytest.raises(RecipeError, match="'t' of slerp must be in \\[0, 1\\]"):
        check_params("slerp", {"t": [0, 0.5, 1.2]}, "parameters")
    with pytest.raises(RecipeError, match="'density' of dare_ties must be in \\[0, 1\\]"):
        check_params("dare_ties", {"weight": 1, "density": 1.5}, "models[0]")
    with pytest.raises(RecipeError, match="'elect' of ties must be one of weighted, unweighted"):
        check_params("ties", {"weight": 1, "elect": "paper"}, "parameters")
    with pytest.raises(RecipeError, match="'normalize' of ties must be true or false"):
        check_params("ties", {"weight": 1, "normalize": "yes"}, "parameters")
    with pytest.raises(RecipeError, match="density ± epsilon"):
        check_params("della", {"density": 0.1, "epsilon": 0.15}, "parameters", scope="global")


def test_call_method_maps_lambda_and_fills_defaults():
    base, xs = family((4, 5), 2)
    out = call_method(
        "task_arithmetic", [mxa(x) for x in xs], mxa(base), {"weight": [1.0, 1.0], "lambda": 0.5}
    )
    close(out, np_gta(xs, base, [1, 1], lam=0.5))
    out = call_method("ties", [mxa(x) for x in xs], mxa(base), {"weight": [1.0, 2.0]})
    close(out, np_gta(xs, base, [1, 2], consensus=True, normalize=True))
    with pytest.raises(RecipeError, match="requires parameter 'weight'"):
        call_method("ties", [mxa(x) for x in xs], mxa(base), {})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_through_the_registry(name):
    spec = METHODS[name]
    n = max(spec.min_models, 2) if spec.max_models is None else spec.max_models
    base, xs = family((6, 8), n)
    params = {k: [1.0] * n for k, v in spec.tensor_params.items() if v is REQUIRED}
    params.update({k: 0.5 for k, v in spec.global_params.items() if v is REQUIRED})
    if "density" in spec.tensor_params:
        params["density"] = 0.5
    keys = [m.derive_key(0, "w", i) for i in range(n)]
    tensors = [mxa(x) for x in xs]
    out = call_method(name, tensors, mxa(base) if spec.base == "required" else None, params, keys)
    assert out.shape == base.shape and out.dtype == mx.float32
    assert np.all(np.isfinite(np.array(out)))


def test_long_reductions_are_accurate():
    # A flat float32 mx.sum over ~2M entries drifts by ~1e-3 relative on the CPU.
    x = (1.0 + 0.01 * RNG.standard_normal(2**21 + 3)).astype(np.float32)
    ours = float(fsum(mxa(x)))
    assert ours == pytest.approx(x.astype(np.float64).sum(), rel=2e-6)
    a, b = x.reshape(-1), x[::-1].copy()
    close(m.slerp([mxa(b)], mxa(a), t=0.5), np_slerp(0.5, a, b), rtol=1e-5)
