"""Task arithmetic, TIES and DARE over row blocks of a large tensor: the same bits, less memory.

``generalized_task_arithmetic`` keeps one float32 task vector per model alive at once (plus
masks and |δ|), ≈ 6-8× the tensor in float32 at peak. Here the inputs stay in their stored
dtype and every float32 temporary lives for one block of rows (``BLOCK_ENTRIES`` entries):

1. statistics, per model, in a streaming pass: the TIES top-k threshold (a sample brackets the
   k-th largest |δ|; the entries inside the bracket are gathered block by block and ranked,
   as ``common.kth_largest`` does) or, for DARE's L1 rescale, ‖δ‖₁ and ‖δ⊙m‖₁ from per-block
   level-1 partial sums that ``common.fsum`` then finishes exactly as it would have;
2. the combine pass: per block, δᵢ → mask → the same compiled sign-election / mean kernel,
   cast to the output dtype at once.

Results equal the whole-tensor computation bit for bit (``tests/merge/test_row_blocks.py``).
Unsupported settings (other sparsifiers, the paper's unweighted election) return None and the
caller uses the whole-tensor path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from mlxmerge.merge.methods import sparsify as sp
from mlxmerge.merge.methods.common import (
    BLOCK,
    SAMPLE_SIZE,
    fsum,
    kth_bracket,
    per_model,
    streams,
)
from mlxmerge.merge.methods.task_arithmetic import _combine_kernel, generalized_task_arithmetic

BLOCK_ENTRIES = 1 << 21  # float32 entries per block: 8 MB per temporary
MIN_ENTRIES = 1 << 22  # below this the whole-tensor path costs little memory anyway


def supported(fn, params: dict, shape: tuple[int, ...]) -> bool:
    """Whether ``fn`` (a method from the table) with ``params`` can run in row blocks."""
    if getattr(fn, "func", None) is not generalized_task_arithmetic:
        return False
    return _supported({**fn.keywords, **params}, shape)


def _supported(kw: dict, shape: tuple[int, ...]) -> bool:
    sparsify = kw.get("sparsify", "none")
    rescaled = kw.get("rescale", False) and sparsify != "none"
    return (
        len(shape) >= 2
        and math.prod(shape) >= MIN_ENTRIES
        and sparsify in ("none", "magnitude", "random")
        and not (sparsify == "magnitude" and rescaled)  # would need a third pass
        and kw.get("elect", "weighted") == "weighted"  # 'unweighted' votes over the tensor
    )


def blocked(
    tensors: Sequence[mx.array], base: mx.array | None, out_dtype: mx.Dtype, **params
) -> mx.array | None:
    """``merge_rows`` when the settings and the shape allow it (``MethodSpec.blocked``), else None."""
    if base is None or not _supported(params, tuple(base.shape)):
        return None
    return merge_rows(tensors, base, out_dtype, **params)


def _block_rows(rows: int, cols: int, entries: int) -> int:
    # Blocks hold a multiple of fsum's 1024-entry groups, so partial sums line up exactly.
    unit = BLOCK // math.gcd(cols, BLOCK)
    return max(unit, entries // cols // unit * unit)


def _level1(a: mx.array) -> mx.array:
    """``fsum``'s first level (sums of 1024-entry groups, then the tail) for one block."""
    flat = a.reshape(-1)
    m = flat.size // BLOCK * BLOCK
    head = mx.sum(flat[:m].reshape(-1, BLOCK), axis=1)
    return head if m == flat.size else mx.concatenate([head, mx.sum(flat[m:])[None]])


_KERNELS: dict[tuple, object] = {}


def _gather_f32(x: mx.array, idx: np.ndarray) -> np.ndarray:
    """``x.reshape(-1)[idx]`` as float32, gathered by NumPy from ``x``'s buffer (an MLX
    ``take`` of scattered entries is ~5x slower on the CPU); same values as MLX's cast."""
    flat = x.reshape(-1)
    if flat.dtype == mx.bfloat16:  # NumPy has no bfloat16: its bits are a float32's top half
        bits = np.asarray(flat.view(mx.uint16))[idx]
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(flat)[idx].astype(np.float32)


def _kept(mask: mx.array, a: mx.array) -> mx.array:
    if "kept" not in _KERNELS:
        _KERNELS["kept"] = mx.compile(lambda m, a: mx.where(m, a, 0.0))
    return _KERNELS["kept"](mask, a)


def _abs_delta(x: mx.array, b: mx.array) -> mx.array:
    if "abs" not in _KERNELS:
        _KERNELS["abs"] = mx.compile(
            lambda x, b: mx.abs(x.astype(mx.float32) - b.astype(mx.float32))
        )
    return _KERNELS["abs"](x, b)


def _fused_mode(rule: dict) -> str | None:
    """How the fused kernel masks one model's δ (None: a rule only ``masked`` handles)."""
    if not rule:
        return "all"
    if rule.get("none"):
        return "zero"
    if "ge" in rule:
        return "ties" if "room" in rule else "ge"
    if "mask" in rule:
        return "mask_scale" if "scale" in rule else "mask_inv" if "inverse_p" in rule else "mask"
    return None


def _fused_param(rule: dict):
    for k in ("ge", "scale", "inverse_p"):
        if k in rule:
            return rule[k].item() if isinstance(rule[k], mx.array) else rule[k]
    return 0.0


def _mask_kernel(mode: str):
    """δ = x − base masked as ``masked`` does for this mode: one compiled kernel per model.

    ``param`` is the threshold, the L1 scale or the keep probability; same operations as
    ``masked``, so the same bits.
    """

    def kernel(x, b, param, *mask):
        d = x.astype(mx.float32) - b.astype(mx.float32)
        if mode == "zero":
            return mx.zeros_like(d)
        if mode == "ge":
            return mx.where(mx.abs(d) >= param, d, 0.0)
        if mode == "gt":
            return mx.where(mx.abs(d) > param, d, 0.0)
        if mode == "mask":
            return mx.where(mask[0], d, 0.0)
        if mode == "mask_scale":
            return mx.where(mask[0], d, 0.0) * param
        if mode == "mask_inv":
            return mx.where(mask[0], d / param, 0.0)
        return d

    key = ("mask", mode)
    if key not in _KERNELS:
        _KERNELS[key] = mx.compile(kernel)
    return _KERNELS[key]


def _threshold(delta, spans, k: int, n: int) -> tuple[float, int, list[int]]:
    """(k-th largest |δ|, entries above it, entries equal to it in each block) without a
    full |δ|."""
    return _thresholds([delta], spans, [k], n)[0]


def _thresholds(deltas, spans, ks: list[int], n: int) -> list[tuple[float, int, list[int]]]:
    """``_threshold`` for several models at once: each block's |δ| of every model is computed
    by MLX, then NumPy gathers each model's band in a thread of its own (NumPy releases the
    GIL), so two models use both cores."""
    from concurrent.futures import ThreadPoolExecutor

    idx = np.random.default_rng(0).integers(0, n, SAMPLE_SIZE)
    brackets = []
    for delta, k in zip(deltas, ks):
        sample = np.sort(np.asarray(mx.abs(delta(None, idx))))
        brackets.append(kth_bracket(sample, k, n))
    above = [0] * len(deltas)
    bands: list[list[np.ndarray]] = [[] for _ in deltas]

    def scan(i, v):
        lo, hi = brackets[i]
        above[i] += int(np.count_nonzero(v > hi))
        bands[i].append(v[(v >= lo) & (v <= hi)])

    with ThreadPoolExecutor(max_workers=2) as pool:
        for r0, r1 in spans:
            a = [d((r0, r1), None, absolute=True).reshape(-1) for d in deltas]
            mx.eval(a)
            list(pool.map(scan, range(len(deltas)), [np.asarray(x) for x in a]))
            del a

        def finish(i):
            k, band = ks[i], np.concatenate(bands[i])
            need = k - above[i]
            if not 0 < need <= band.size:  # a six-sigma miss: rank every entry
                bands[i] = [np.asarray(mx.abs(deltas[i](s, None)).reshape(-1)) for s in spans]
                every = np.concatenate(bands[i])
                thr = float(np.partition(every, every.size - k)[every.size - k])
                n_above = int(np.count_nonzero(every > thr))
            else:
                thr = float(np.partition(band, band.size - need)[band.size - need])
                n_above = above[i] + int(np.count_nonzero(band > thr))
            # every entry equal to thr lies in a band: the bands give each block's ties
            return thr, n_above, [int(np.count_nonzero(b == thr)) for b in bands[i]]

        misses = [
            i for i in range(len(deltas)) if not 0 < ks[i] - above[i] <= sum(map(len, bands[i]))
        ]
        done = {i: finish(i) for i in misses}  # MLX work: in this thread
        rest = [i for i in range(len(deltas)) if i not in done]
        done.update(zip(rest, pool.map(finish, rest)))
    return [done[i] for i in range(len(deltas))]


def _tie_modes(room: int, equal: list[int]) -> list[str]:
    """Per block: keep every tie ("ge"), none ("gt"), or some ("cut": the block's first ones)
    so that exactly ``room`` ties are kept in row-major order."""
    modes, seen = [], 0
    for e in equal:
        modes.append("ge" if seen + e <= room else "gt" if seen >= room else "cut")
        seen += e
    return modes


def merge_rows(
    tensors: Sequence[mx.array],
    base: mx.array,
    out_dtype: mx.Dtype,
    *,
    sparsify: str,
    consensus: str,
    weight: list[float],
    density: list[float] | float = 1.0,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = False,
    rescale_mode: str = "l1",
    disjoint_mean: str = "weight",
    keys: list[mx.array] | None = None,
    trim_scope: str = "tensor",
    trim_thresholds: list[float] | None = None,
    block_entries: int | None = None,
    **_ignored,
) -> mx.array:
    """``generalized_task_arithmetic(tensors, base, ...)`` cast to ``out_dtype``, in row blocks.

    ``tensors`` and ``base`` are the inputs in their stored dtype (bf16: half the memory of
    float32), all of one shape (rows, ...). Returns the evaluated output in ``out_dtype``.
    """
    n_models = len(tensors)
    shape = tuple(base.shape)
    rows, cols = shape[0], math.prod(shape[1:])
    n = rows * cols
    step = _block_rows(rows, cols, block_entries or BLOCK_ENTRIES)
    spans = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    xs = [t.reshape(rows, cols) for t in tensors]
    b = base.reshape(rows, cols)
    w = per_model(weight, n_models, "weight")
    dens = per_model(density, n_models, "density")

    def delta_of(i):
        def delta(span, idx, absolute=False):
            if idx is not None:  # a gather of entries (the threshold's sample)
                idx = np.asarray(idx)
                return mx.array(_gather_f32(xs[i], idx) - _gather_f32(b, idx))
            r0, r1 = span
            if absolute:
                return _abs_delta(xs[i][r0:r1], b[r0:r1])
            return xs[i][r0:r1].astype(mx.float32) - b[r0:r1].astype(mx.float32)

        return delta

    deltas = [delta_of(i) for i in range(n_models)]
    # Per model: how its task vector is masked in the combine pass.
    masks = {}
    if sparsify == "random":  # every model's random mask first
        for i in range(n_models):
            if dens[i] < 1:
                sp.check_density(dens[i], sparsify)
                # one bool per entry: a quarter of a float32 copy
                masks[i] = sp.random_mask(dens[i], shape, keys[i]).reshape(rows, cols)
    trims = {}
    if sparsify == "magnitude" and trim_scope != "model":  # every model's top-k threshold
        todo = [i for i in range(n_models) if dens[i] < 1 and int(dens[i] * n) > 0]
        for i in todo:
            sp.check_density(dens[i], sparsify)
        found = _thresholds([deltas[i] for i in todo], spans, [int(dens[i] * n) for i in todo], n)
        trims = dict(zip(todo, found))
    keep: list[dict] = []
    for i in range(n_models):
        rule: dict = {}
        if sparsify != "none":
            sp.check_density(dens[i], sparsify)
        if sparsify == "magnitude" and trim_scope == "model":
            rule["ge"] = trim_thresholds[i]
        elif sparsify == "magnitude" and dens[i] < 1:
            k = int(dens[i] * n)
            if k <= 0:
                rule["none"] = True
            else:
                thr, n_above, equal = trims[i]
                rule["ge"] = thr
                if sum(equal) > k - n_above:  # ties at the threshold: keep the first ones
                    rule["room"], rule["seen"] = k - n_above, 0
                    rule["blocks"], rule["equal"] = _tie_modes(k - n_above, equal), equal
        elif sparsify == "random" and dens[i] < 1:
            rule["mask"] = mask = masks[i]
            if rescale and rescale_mode == "l1":
                before, after = [], []
                for r0, r1 in spans:
                    a = _abs_delta(xs[i][r0:r1], b[r0:r1])
                    pb = _level1(a)
                    pa = _level1(_kept(mask[r0:r1], a))
                    mx.eval(pb, pa)
                    before.append(pb)
                    after.append(pa)
                l1_before = fsum(mx.concatenate(before))
                l1_after = fsum(mx.concatenate(after))
                ok = (l1_before >= sp.L1_EPS) & (l1_after >= sp.L1_EPS)
                rule["scale"] = mx.where(ok, l1_before / mx.where(ok, l1_after, 1.0), 1.0)
                mx.eval(rule["scale"])
            elif rescale:
                rule["inverse_p"] = dens[i]
        keep.append(rule)

    def masked(i, r0, r1):
        d = deltas[i]((r0, r1), None)
        rule = keep[i]
        if rule.get("none"):
            return mx.zeros_like(d)
        if "ge" in rule:
            a = mx.abs(d)
            if "room" in rule:  # the exact top-k with row-major tie-breaking, block by block
                equal = (a == rule["ge"]).reshape(-1)
                rank = rule["seen"] + mx.cumsum(equal.astype(mx.int32))
                rule["seen"] += int(mx.sum(equal.astype(mx.int32)).item())
                tie = (equal & (rank <= rule["room"])).reshape(a.shape)
                return mx.where((a > rule["ge"]) | tie, d, 0.0)
            return mx.where(a >= rule["ge"], d, 0.0)
        if "mask" in rule:
            m = rule["mask"][r0:r1]
            if "scale" in rule:
                return mx.where(m, d, 0.0) * rule["scale"]
            if "inverse_p" in rule:
                return mx.where(m, d / rule["inverse_p"], 0.0)
            return mx.where(m, d, 0.0)
        return d

    total_w = float(sum(w))
    scalars = mx.array([lambda_, 1.0 if abs(total_w) < 1e-8 else total_w], dtype=mx.float32)
    weights = mx.array(w, dtype=mx.float32)
    modes = tuple(_fused_mode(rule) for rule in keep)
    out = []
    if None not in modes:  # compiled kernels only, from the stored inputs to out_dtype
        params = mx.array([_fused_param(rule) for rule in keep], dtype=mx.float32)
        combine = _combine_kernel(n_models, consensus, "weighted", disjoint_mean, normalize,
                                  out_dtype)  # fmt: skip

        def block_delta(i, j, r0, r1):
            mode, rule = modes[i], keep[i]
            if mode == "ties":  # exact top-k: every tie, none, or (one block) the first ones
                mode = rule["blocks"][j]
                if mode == "cut":
                    rule["seen"] = sum(rule["equal"][:j])  # ties in the blocks before
                    return masked(i, r0, r1)
            mask = [rule["mask"][r0:r1]] if "mask" in rule else []
            return _mask_kernel(mode)(xs[i][r0:r1], b[r0:r1], params[i], *mask)

        # Two blocks at a time on two CPU streams: each stream runs on its own thread.
        pool = streams()
        for pair in range(0, len(spans), len(pool)):
            ys = []
            for j in range(pair, min(pair + len(pool), len(spans))):
                r0, r1 = spans[j]
                with mx.stream(pool[j - pair]):
                    ds = [block_delta(i, j, r0, r1) for i in range(n_models)]
                    ys.append(combine(b[r0:r1], scalars, weights, *ds))
            mx.eval(ys)
            out.extend(ys)
        ds = ys = None
    else:
        combine = _combine_kernel(n_models, consensus, "weighted", disjoint_mean, normalize)
        for r0, r1 in spans:
            ds = [masked(i, r0, r1) for i in range(n_models)]
            y = combine(b[r0:r1].astype(mx.float32), scalars, weights, *ds).astype(out_dtype)
            mx.eval(y)
            out.append(y)
    y = mx.concatenate(out).reshape(shape)
    mx.eval(y)
    return y
