"""Generalized task arithmetic: task arithmetic, TIES, DARE, breadcrumbs and DELLA as one function.

With δᵢ = xᵢ − base, an optional sparsification δᵢ → δ̃ᵢ (see ``sparsify``) and Wᵢ = wᵢ·δ̃ᵢ:
  consensus none: mix = Σ Wᵢ,                  divisor = Σ wᵢ        (1 where |Σ wᵢ| < 1e-8)
  consensus sum:  s = sign(Σ Wᵢ) (0 → +1),     mᵢ = [sign(Wᵢ) = s],
                  mix = Σ mᵢWᵢ,                divisor = Σ mᵢwᵢ      (1 where 0)
  out = base + λ · (mix / divisor if normalize else mix)

Papers: task arithmetic arXiv:2212.04089, TIES arXiv:2306.01708, DARE arXiv:2311.03099,
breadcrumbs arXiv:2312.06795, DELLA arXiv:2406.11617, SCE arXiv:2408.07990.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from mlxmerge.errors import RecipeError
from mlxmerge.merge.methods import sparsify as sp
from mlxmerge.merge.methods.common import (
    check_choice,
    check_shapes,
    compiled,
    fsum,
    per_model,
    release,
    top_k_mask,
)

CONSENSUS = ("none", "sum")
ELECT = ("weighted", "unweighted")
DISJOINT_MEAN = ("weight", "count")


def generalized_task_arithmetic(
    tensors: list[mx.array],
    base: mx.array,
    *,
    weight: list[float],
    density: list[float] | float = 1.0,
    gamma: list[float] | float = 0.01,
    epsilon: list[float] | float = 0.15,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = False,
    rescale_mode: str = "l1",
    int8_mask: bool = False,
    elect: str = "weighted",
    disjoint_mean: str = "weight",
    keys: list[mx.array] | None = None,
    trim_scope: str = "tensor",
    trim_thresholds: list[float] | None = None,
    sparsify: str = "none",
    consensus: str = "none",
) -> mx.array:
    """Merge task vectors relative to ``base``; see the module docstring for the formula.

    ``int8_mask`` is accepted for mergekit recipes and ignored (a memory saving there).
    ``elect``: 'weighted' elects sign(Σ wᵢδᵢ) (mergekit), 'unweighted' sign(Σ δᵢ) (paper).
    ``disjoint_mean``: with normalize, divide by Σ of agreeing weights (mergekit) or by the
    count of agreeing entries (paper, PEFT).
    ``trim_scope``: 'tensor' keeps the top ``density`` of each tensor (mergekit); 'model' keeps
    entries with |δ| ≥ the model-wide threshold in ``trim_thresholds`` (TIES paper), which the
    runner computes over every tensor of each model before merging.
    """
    check_choice(sparsify, "sparsify", sp.SPARSIFY)
    check_choice(consensus, "consensus", CONSENSUS)
    check_choice(rescale_mode, "rescale_mode", sp.RESCALE_MODES)
    check_choice(elect, "elect", ELECT)
    check_choice(disjoint_mean, "disjoint_mean", DISJOINT_MEAN)
    check_choice(trim_scope, "trim_scope", ("tensor", "model"))
    if not tensors:
        return base
    check_shapes(tensors, base)
    n = len(tensors)
    w = per_model(weight, n, "weight")
    dens = per_model(density, n, "density")
    gam = per_model(gamma, n, "gamma")
    eps = per_model(epsilon, n, "epsilon")
    if sparsify in ("random", "della_magprune") and (keys is None or len(keys) != n):
        raise ValueError(f"sparsify={sparsify!r} needs one PRNG key per model (derive_key)")

    deltas = []
    for i in range(n):
        d = tensors[i] - base
        release(tensors, i)
        if sparsify != "none":
            sp.check_density(dens[i], sparsify)
        if sparsify == "magnitude" and trim_scope == "model":
            if trim_thresholds is None:
                raise ValueError("trim_scope='model' needs the model-wide trim_thresholds")
            d = mx.where(mx.abs(d) >= trim_thresholds[i], d, 0.0)
        elif sparsify == "magnitude":
            d = sp.magnitude(d, dens[i], rescale, rescale_mode)
        elif sparsify == "random":
            d = sp.bernoulli(d, dens[i], keys[i], rescale, rescale_mode)
        elif sparsify == "magnitude_outliers":
            d = sp.magnitude_outliers(d, dens[i], gam[i], rescale, rescale_mode)
        elif sparsify == "della_magprune":
            d = sp.della_magprune(d, dens[i], eps[i], keys[i], rescale, rescale_mode)
        if sparsify != "none":
            mx.eval(d)  # frees this model's |δ|, masks and random draws before the next one
        deltas.append(d)
    kernel = _combine_kernel(n, consensus, elect, disjoint_mean, normalize)
    total_w = float(sum(w))
    scalars = mx.array([lambda_, 1.0 if abs(total_w) < 1e-8 else total_w], dtype=mx.float32)
    return kernel(base, scalars, mx.array(w, dtype=mx.float32), *deltas)


def _combine_kernel(
    n: int,
    consensus: str,
    elect: str,
    disjoint_mean: str,
    normalize: bool,
    out_dtype: mx.Dtype | None = None,
):
    """Weighting, sign election and the (disjoint) mean as compiled elementwise kernels.

    Returns ``combine(base, scalars, weights, *deltas)``: float32 (or ``out_dtype``), no
    (n_models, *shape) stack ever materialized. Weights and scalars are array inputs, so
    per-layer gradients do not recompile. The sign election runs as three small kernels (the
    merged sum, the agreeing weight, the final mean) rather than one: MLX's CPU code generator
    (g++ -O3, mlx 0.32) vectorizes each of them, not their fusion, which ran 4-6x slower
    (benchmarks/README.md). Same operations in the same order either way: same bits.
    """
    cast = (lambda y: y) if out_dtype is None else (lambda y: y.astype(out_dtype))

    def finish(base, lambda_, mix, divisor):
        if normalize:
            mix = mix / divisor
        return cast(base.astype(mx.float32) + mix * lambda_)

    if consensus != "sum" or elect != "weighted":
        # One kernel: task arithmetic's weighted sum, or the paper's election (a reduction).
        def whole(base, scalars, weights, *deltas):
            lambda_, weight_sum = scalars[0], scalars[1]
            weighted = [d * weights[i] for i, d in enumerate(deltas)]
            if consensus == "sum":
                s = mx.sign(_sum(deltas))
                positive = mx.where(s == 0, mx.sum(s) >= 0, s > 0)
                mix, divisor = _disjoint(weighted, list(deltas), positive, weights, disjoint_mean)
            else:
                mix, divisor = _sum(weighted), weight_sum
            return finish(base, lambda_, mix, divisor)

        key = ("gta_whole", n, consensus, elect, disjoint_mean, normalize, out_dtype)
        return compiled(key, lambda: whole)

    # The election as selects on float comparisons only, each sum starting from its first
    # term: g++ if-converts and vectorizes these; a select on a bool-valued select, or a
    # select whose result is multiplied or divided, leaves a branch in the loop (it
    # "could trap" under -ftrapping-math) and runs ~20x slower. Same values as ``_disjoint``:
    # v·s > 0 with s = ±1 is "agrees with the elected sign", zeros never agree.
    def elected(weights, deltas):
        weighted = [d * weights[i] for i, d in enumerate(deltas)]
        sign = mx.where(_sum(weighted) >= 0, 1.0, -1.0)  # a zero sum elects +1 (mergekit)
        return weighted, [v * sign > 0 for v in weighted]

    def mix_kernel(weights, *deltas):
        weighted, agree = elected(weights, deltas)
        return _sum([mx.where(a, v, 0.0) for v, a in zip(weighted, agree)])

    def divisor_kernel(weights, *deltas):  # 0 where no model agrees: final_kernel makes it 1
        _, agree = elected(weights, deltas)
        shares = [weights[i] if disjoint_mean == "weight" else 1.0 for i in range(n)]
        return _sum([mx.where(a, share, 0.0) for a, share in zip(agree, shares)])

    def final_kernel(base, scalars, mix, divisor):
        return finish(base, scalars[0], mix, divisor + mx.where(divisor == 0, 1.0, 0.0))

    mix_k = compiled(("gta_mix", n), lambda: mix_kernel)
    div_k = compiled(("gta_divisor", n, disjoint_mean), lambda: divisor_kernel)
    final_k = compiled(("gta_final", normalize, out_dtype), lambda: final_kernel)

    def combine(base, scalars, weights, *deltas):
        mix = mix_k(weights, *deltas)
        divisor = div_k(weights, *deltas) if normalize else mix
        return final_k(base, scalars, mix, divisor)

    return combine


def _sum(xs):
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    return total


def _disjoint(weighted, voters, positive, weights, disjoint_mean):
    """Σ of the weighted deltas whose voter agrees with the elected sign, and Σ of their
    weights (or their count); a divisor of 0 (no model agrees) becomes 1."""
    mix = mx.zeros_like(weighted[0])
    divisor = mx.zeros_like(weighted[0])
    for i, v in enumerate(voters):
        agree = mx.where(positive, v > 0, v < 0)  # zeros never agree
        mix = mix + mx.where(agree, weighted[i], 0.0)
        share = weights[i] if disjoint_mean == "weight" else 1.0
        divisor = divisor + mx.where(agree, share, 0.0)
    return mix, mx.where(divisor == 0, 1.0, divisor)


def _gta(name: str, sparsify: str, consensus: str, normalize: bool, rescale: bool):
    fn = partial(
        generalized_task_arithmetic,
        sparsify=sparsify,
        consensus=consensus,
        normalize=normalize,
        rescale=rescale,
    )
    fn.__name__ = name
    return fn


# Defaults exactly as mergekit's registry (normalize, rescale).
task_arithmetic = _gta("task_arithmetic", "none", "none", False, False)
ties = _gta("ties", "magnitude", "sum", True, False)
dare_linear = _gta("dare_linear", "random", "none", False, True)
dare_ties = _gta("dare_ties", "random", "sum", False, True)
breadcrumbs = _gta("breadcrumbs", "magnitude_outliers", "none", False, False)
breadcrumbs_ties = _gta("breadcrumbs_ties", "magnitude_outliers", "sum", False, False)
della = _gta("della", "della_magprune", "sum", True, True)
della_linear = _gta("della_linear", "della_magprune", "none", False, True)


def sce(
    tensors: list[mx.array],
    base: mx.array,
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
) -> mx.array:
    """SCE: Select (top-k by variance across models), Calculate (wᵢ ∝ mean(τᵢ²)), Erase (signs).

    τᵢ = xᵢ − base; keep the int(nnz(var)·select_topk) positions of largest var over models;
    m = sign consensus of Σ τᵢ; out = base + Σ wᵢmᵢτᵢ / max(Σ wᵢmᵢ, 1e-6).
    """
    if not tensors:
        return base
    check_shapes(tensors, base)
    if isinstance(select_topk, bool) or not 0 <= select_topk <= 1:
        raise RecipeError(f"sce: parameter 'select_topk' must lie in [0, 1], got {select_topk!r}.")
    n = len(tensors)
    keep = mx.array(True)  # the selected positions
    if select_topk < 1:
        var = sce_variance(n)(base, *tensors)
        if select_topk <= 0:
            keep = mx.zeros(var.shape, dtype=mx.bool_)
        else:
            k = int(mx.sum(var != 0).item() * select_topk)
            keep = top_k_mask(var, k)
        del var
    energy = mx.stack([fsum(sce_square(keep, x, base)) / x.size for x in tensors])  # mean τᵢ²
    return sce_kernel(n)(base, sce_weights(energy), keep, *tensors)


def sce_weights(energy: mx.array) -> mx.array:
    """SCE's model weights from the energies mean(τᵢ²): normalized, uniform when they sum to ~0."""
    total = mx.sum(energy)
    n = energy.shape[0]
    return mx.where(mx.abs(total) < 1e-6, 1.0 / n, energy / mx.where(total == 0, 1, total))


def sce_variance(n: int):
    """Compiled ``(base, *xs) -> var`` over models of τᵢ = xᵢ − base (inputs of any float dtype).

    Equals ``mx.var(mx.stack(τ), axis=0)`` (mean = Σ·(1/n), then the mean square deviation),
    fused into one pass instead of a stacked copy and five (50x faster on the CPU).
    """

    def kernel(base, *xs):
        b = base.astype(mx.float32)
        tv = [x.astype(mx.float32) - b for x in xs]
        total = tv[0]
        for t in tv[1:]:
            total = total + t
        mean = total * (1.0 / n)
        acc = None
        for t in tv:
            d = mx.square(t - mean)
            acc = d if acc is None else acc + d
        return acc * (1.0 / n)

    return compiled(("sce_variance", n), lambda: kernel)


@mx.compile
def sce_square(keep: mx.array, x: mx.array, base: mx.array) -> mx.array:
    """τ² of the selected positions (0 elsewhere), float32, for SCE's energy mean(τ²)."""
    t = mx.where(keep, x.astype(mx.float32) - base.astype(mx.float32), 0.0)
    return t * t


def sce_kernel(n: int):
    """SCE's erase and mean as one compiled elementwise kernel ``(base, weights, keep, *xs)``.

    τᵢ = xᵢ − base where ``keep`` (0 elsewhere); s = sign(Σ τᵢ) (0 → +1); eᵢ = wᵢ where
    sign(τᵢ) = s; out = base + Σ eᵢτᵢ / max(Σ eᵢ, 1e-6), float32. One fused pass instead of
    ~15 (5-10x faster on the CPU), shared by ``sce`` and its row blocks so both round alike.
    """

    def kernel(base, weights, keep, *xs):
        b = base.astype(mx.float32)
        tv = [mx.where(keep, x.astype(mx.float32) - b, 0.0) for x in xs]
        total = tv[0]
        for t in tv[1:]:
            total = total + t
        s = mx.where(total >= 0, 1.0, -1.0)  # a zero sum elects +1 (mergekit)
        mix = divisor = None
        for i, t in enumerate(tv):
            e = mx.where(mx.sign(t) == s, weights[i], 0.0)  # zeros never agree
            mix = t * e if mix is None else mix + t * e
            divisor = e if divisor is None else divisor + e
        return b + mix / mx.maximum(divisor, 1e-6)

    return compiled(("sce", n), lambda: kernel)
