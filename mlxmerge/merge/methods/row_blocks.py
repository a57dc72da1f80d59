"""Task arithmetic, TIES, DARE, breadcrumbs and DELLA over row blocks: the same result, less memory.

``generalized_task_arithmetic`` keeps one float32 task vector per model alive at once (plus
masks and |δ|), ≈ 6-8× the tensor in float32 at peak. Here the inputs stay in their stored
dtype and every float32 temporary lives for one block of rows (``BLOCK_ENTRIES`` entries):

1. statistics, per model, in streaming passes: top-k thresholds of |δ| (TIES keeps the k
   largest, breadcrumbs also drops the largest ones: a sample brackets each k-th largest |δ|,
   the entries inside the brackets are gathered block by block in one pass and ranked, as
   ``common.kth_largest`` does); DARE's Bernoulli draw, or DELLA's per-row rank probabilities
   (rows are independent, so a block of rows gives the same ranks) against the uint32 draw
   behind ``mx.random.bernoulli``, made whole once; for the L1 rescale,
   ‖δ‖₁ and ‖δ⊙m‖₁ from per-block level-1 partial sums that ``common.fsum`` then finishes
   exactly as it would have;
2. the combine pass: per block, δᵢ → mask → rescale → the same compiled sign-election / mean
   kernel, cast to the output dtype at once.

Results equal the whole-tensor computation bit for bit (``tests/merge/test_row_blocks.py``;
to float32 rounding of the L1 sums where a row is too long for blocks of whole
``common.CHUNK``s).
Unsupported settings (the paper's unweighted election) return None and the caller uses the
whole-tensor path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import mlx.core as mx
import numpy as np

from mlxmerge.merge.methods import sparsify as sp
from mlxmerge.merge.methods.block_stats import (
    TopK,
    bernoulli_bits,
    bernoulli_of_bits,
    block_spans,
    finish_fsum,
    level1,
    top_ks,
    top_ks_many,
)
from mlxmerge.merge.methods.common import compiled, per_model, streams
from mlxmerge.merge.methods.task_arithmetic import _combine_kernel, generalized_task_arithmetic

BLOCK_ENTRIES = 1 << 21  # float32 entries per block: 8 MB per temporary
MIN_ENTRIES = 1 << 22  # below this the whole-tensor path costs little memory anyway


def supported(fn, params: dict, shape: tuple[int, ...]) -> bool:
    """Whether ``fn`` (a method from the table) with ``params`` can run in row blocks."""
    if getattr(fn, "func", None) is not generalized_task_arithmetic:
        return False
    return _supported({**fn.keywords, **params}, shape)


def _supported(kw: dict, shape: tuple[int, ...]) -> bool:
    return (
        len(shape) >= 2
        and math.prod(shape) >= MIN_ENTRIES
        and kw.get("sparsify", "none") in sp.SPARSIFY
        and kw.get("elect", "weighted") == "weighted"  # 'unweighted' votes over the tensor
        and kw.get("rescale_mode", "l1") in sp.RESCALE_MODES
        and kw.get("disjoint_mean", "weight") in ("weight", "count")
        and kw.get("trim_scope", "tensor") in ("tensor", "model")
    )


def blocked(
    tensors: Sequence[mx.array], base: mx.array | None, out_dtype: mx.Dtype, **params
) -> mx.array | None:
    """``merge_rows`` when the settings and the shape allow it (``MethodSpec.blocked``), else None."""
    if base is None or not _supported(params, tuple(base.shape)):
        return None
    return merge_rows(tensors, base, out_dtype, **params)


class _Keep:
    """How one model's task vector is masked and rescaled, block by block.

    ``mask(j, r0, r1, δ)`` gives block j's keep mask (None: keep all) unless a statistics pass
    cached them in ``masks``; ``scale`` (L1 rescale) multiplies the kept entries; ``inverse_p``
    divides them by their keep probability (a number, or a function of the block's δ: DELLA).
    ``fused(j, ...)``: a top-k mask's block in compiled kernels; ``block`` also runs a mask that
    does not depend on δ (``draw``, or ``masks`` cached as uint8) through one compiled kernel.
    """

    def __init__(self):
        self.zero = False
        self.mask: Callable[[int, int, int, mx.array], mx.array] | None = None
        self.masks: list[mx.array] | None = None
        self.scale: mx.array | None = None
        self.inverse_p = None
        self.tops: list[TopK] = []  # [kept] or [kept, dropped] for the magnitude masks
        self.draw: Callable[[int, int], mx.array] | None = None  # DARE: rows r0:r1's mask

    def block(self, j: int, r0: int, r1: int, x: mx.array, b: mx.array, delta) -> mx.array:
        """Block ``j``'s masked (and rescaled) δ from the (rows, cols) stored-dtype inputs."""
        kept = self.fused(j, r0, r1, x, b)
        if kept is None:
            m = self.masks[j] if self.masks is not None else None
            if m is None and self.draw is not None:
                m = self.draw(r0, r1)
            if m is None or self.zero or callable(self.inverse_p):
                return self.apply(j, r0, r1, delta(r0, r1))
            mode, param = "mask", 0.0  # a mask that does not depend on δ: one compiled kernel
            if self.scale is not None:
                mode, param = "scale", self.scale
            elif self.inverse_p is not None:
                mode, param = "inverse_p", self.inverse_p
            return _mask_kernel(mode)(x[r0:r1], b[r0:r1], mx.array(param, dtype=mx.float32), m)
        # δ⊙m · scale: the same values as where(m, δ, 0) · scale (a dropped entry is 0 either way)
        return kept if self.scale is None else kept * self.scale

    def fused(self, j: int, r0: int, r1: int, x: mx.array, b: mx.array) -> mx.array | None:
        """δ⊙m of block ``j`` in one compiled kernel (top-k masks without a tie to rank there)."""
        if not self.tops or self.masks is not None or self.inverse_p is not None or self.zero:
            return None
        bounds = [t.bound(j) for t in self.tops]
        if len(bounds) == 1 and bounds[0] is None:  # the block where TIES's tie room runs out
            return _cut_block(self.tops[0], x[r0:r1], b[r0:r1])
        if any(bd is None for bd in bounds):
            return None
        flat = [v for thr, inclusive in bounds for v in (thr, float(inclusive))]
        return _top_masked(len(bounds))(x[r0:r1], b[r0:r1], mx.array(flat))

    def apply(self, j: int, r0: int, r1: int, d: mx.array) -> mx.array:
        if self.zero:
            return mx.zeros_like(d)
        if self.masks is not None:
            m = self.masks[j] > 0  # cached as uint8
        elif self.mask is not None:
            m = self.mask(j, r0, r1, d)
        else:
            return d
        if self.scale is not None:
            return mx.where(m, d, 0.0) * self.scale
        if self.inverse_p is not None:
            p = self.inverse_p(d) if callable(self.inverse_p) else self.inverse_p
            return mx.where(m, d / p, 0.0)
        return mx.where(m, d, 0.0)


def _cut_block(top: TopK, x: mx.array, b: mx.array) -> mx.array:
    """δ⊙m of the block holding the top-k cut: ties at the threshold are kept up to the
    ``top.left``-th in row-major order. NumPy finds that entry's position p; the entries up to
    p keep |δ| ≥ thr and the rest |δ| > thr, each part in the compiled kernel (the same mask as
    ``TopK.mask``'s cumsum, without one)."""
    a = _abs_delta(x, b)
    mx.eval(a)
    p = int(np.flatnonzero(np.asarray(a).reshape(-1) == np.float32(top.thr))[top.left - 1])
    fx, fb = x.reshape(-1), b.reshape(-1)
    kernel = _top_masked(1)
    head = kernel(fx[: p + 1], fb[: p + 1], mx.array([top.thr, 1.0]))
    tail = kernel(fx[p + 1 :], fb[p + 1 :], mx.array([top.thr, 0.0]))
    return mx.concatenate([head, tail]).reshape(x.shape)


def _top_masked(n_bounds: int):
    """Compiled ``(x, b, bounds) -> δ`` kept by 1 or 2 (TopK kept, TopK dropped) bounds.

    ``bounds`` = [thr, inclusive, ...] (float32); the same selection as the masks built op by
    op (comparisons and a select are exact), in one pass.
    """

    def kernel(x, b, bounds):
        d = x.astype(mx.float32) - b.astype(mx.float32)
        a = mx.abs(d)
        keep = mx.where(bounds[1] > 0, a >= bounds[0], a > bounds[0])
        if n_bounds == 2:
            keep = keep & ~mx.where(bounds[3] > 0, a >= bounds[2], a > bounds[2])
        return mx.where(keep, d, 0.0)

    return compiled(("top_masked", n_bounds), lambda: kernel)


@mx.compile
def _abs_delta(x: mx.array, b: mx.array) -> mx.array:
    return mx.abs(x.astype(mx.float32) - b.astype(mx.float32))


@mx.compile
def _kept(m: mx.array, a: mx.array) -> mx.array:
    # a ≥ 0 times a uint8 0/1 mask: where(m, a, 0)'s bits. A select on a uint8 (or bool)
    # condition compiles to a scalar loop on the CPU, ~10x slower than this product.
    return a * m.astype(mx.float32)


def gather_f32(x: mx.array, idx: np.ndarray) -> np.ndarray:
    """``x.reshape(-1)[idx]`` as float32, gathered by NumPy from ``x``'s buffer (an MLX
    ``take`` of scattered entries is ~5x slower on the CPU); same values as MLX's cast."""
    flat = x.reshape(-1)
    if flat.dtype == mx.bfloat16:  # NumPy has no bfloat16: its bits are a float32's top half
        bits = np.asarray(flat.view(mx.uint16))[idx]
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(flat)[idx].astype(np.float32)


def _mask_kernel(mode: str):
    """``(x, b, param, mask) -> δ`` masked and rescaled as ``_Keep.apply`` does, compiled:
    ``mask`` (uint8 0/1) keeps δ, times ``param`` (the L1 scale) or divided by it (the keep
    probability). A product with the mask rather than a select (10x faster on the CPU, see
    ``_kept``): the same values, a dropped entry may be −0.0 where the select gives 0.0."""

    def kernel(x, b, param, m):
        d = x.astype(mx.float32) - b.astype(mx.float32)
        keep = m.astype(mx.float32)
        if mode == "scale":
            return d * (keep * param)
        if mode == "inverse_p":
            return (d / param) * keep
        return d * keep

    return compiled(("row_mask", mode), lambda: kernel)


def _l1_scale(spans, parts) -> tuple[mx.array, list[mx.array]]:
    """``sparsify.rescale_l1``'s factor ‖δ‖₁/‖δ⊙m‖₁ (1 below 1e-7), and the block masks.

    ``parts(j, r0, r1)`` builds block j's (|δ|, |δ⊙m|, m or None: a mask to keep); consecutive
    blocks run on both streams."""
    before, after, masks = [], [], []
    pool = streams()
    for j, (r0, r1) in enumerate(spans):
        with mx.stream(pool[j % len(pool)]):
            a, kept, m = parts(j, r0, r1)
            before.append(level1(a))
            after.append(level1(kept))
        if m is not None:
            masks.append(m.astype(mx.uint8))  # uint8: 1 byte an entry, multiplied in later
        if j % len(pool) == len(pool) - 1 or j == len(spans) - 1:
            mx.eval(before[-len(pool) :], after[-len(pool) :], masks[-len(pool) :])
    return _l1_factor(before, after), masks


def _l1_parts(rule: _Keep, delta, magnitude, x, b, j: int, r0: int, r1: int):
    """Block j's (|δ|, |δ⊙m|, mask to keep or None) for ``_l1_scale``: compiled kernels for a
    top-k mask (redone in the combine pass) and for a drawn mask (kept), op by op else."""
    if rule.tops:
        masked = rule.fused(j, r0, r1, x, b)
        if masked is None:
            d = delta(r0, r1)
            masked = mx.where(rule.mask(j, r0, r1, d), d, 0.0)
        return _abs_delta(x[r0:r1], b[r0:r1]), mx.abs(masked), None
    if rule.draw is not None:
        a, m = magnitude((r0, r1), None), rule.draw(r0, r1)
        return a, _kept(m, a), m
    d = delta(r0, r1)
    m = rule.mask(j, r0, r1, d)
    return mx.abs(d), mx.abs(mx.where(m, d, 0.0)), m


def _l1_factor(before: list[mx.array], after: list[mx.array]) -> mx.array:
    """‖δ‖₁/‖δ⊙m‖₁ (1 where either is below 1e-7) from the blocks' level-1 sums."""
    l1_before, l1_after = finish_fsum(before), finish_fsum(after)
    ok = (l1_before >= sp.L1_EPS) & (l1_after >= sp.L1_EPS)
    scale = mx.where(ok, l1_before / mx.where(ok, l1_after, 1.0), 1.0)
    mx.eval(scale)
    return scale


def merge_rows(
    tensors: Sequence[mx.array],
    base: mx.array,
    out_dtype: mx.Dtype,
    *,
    sparsify: str,
    consensus: str,
    weight: list[float],
    density: list[float] | float = 1.0,
    gamma: list[float] | float = 0.01,
    epsilon: list[float] | float = 0.15,
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
    Raises ``RecipeError`` for the same bad parameters as the whole-tensor function.
    """
    n_models = len(tensors)
    shape = tuple(base.shape)
    rows, cols = shape[0], math.prod(shape[1:])
    spans = block_spans(rows, cols, block_entries or BLOCK_ENTRIES)
    xs = [t.reshape(rows, cols) for t in tensors]
    b = base.reshape(rows, cols)
    w = per_model(weight, n_models, "weight")
    dens = per_model(density, n_models, "density")
    gam = per_model(gamma, n_models, "gamma")
    eps = per_model(epsilon, n_models, "epsilon")
    if sparsify in ("random", "della_magprune") and (keys is None or len(keys) != n_models):
        raise ValueError(f"sparsify={sparsify!r} needs one PRNG key per model (derive_key)")

    def delta_of(i):
        def delta(r0, r1):
            return xs[i][r0:r1].astype(mx.float32) - b[r0:r1].astype(mx.float32)

        def magnitude(span, idx):
            if idx is not None:  # a gather of entries (the thresholds' sample)
                idx = np.asarray(idx)
                return mx.array(np.abs(gather_f32(xs[i], idx) - gather_f32(b, idx)))
            r0, r1 = span
            return _abs_delta(xs[i][r0:r1], b[r0:r1])

        return delta, magnitude

    tops: dict[int, list[TopK]] = {}
    if sparsify in ("magnitude", "magnitude_outliers") and trim_scope != "model":
        # every model's thresholds in one pass over the blocks (both cores)
        todo = [i for i in range(n_models) if 0 < dens[i] < 1]
        ks = [_magnitude_ks(sparsify, dens[i], gam[i], rows * cols) for i in todo]
        found = top_ks_many([delta_of(i)[1] for i in todo], spans, ks, rows * cols)
        tops = dict(zip(todo, found))
    keep = [_keep(i, *delta_of(i), xs[i], b, spans, shape, sparsify, dens[i], gam[i], eps[i],
                  rescale, rescale_mode, keys, trim_scope, trim_thresholds, tops.get(i))
            for i in range(n_models)]  # fmt: skip

    combine = _combine_kernel(n_models, consensus, "weighted", disjoint_mean, normalize, out_dtype)
    total_w = float(sum(w))
    scalars = mx.array([lambda_, 1.0 if abs(total_w) < 1e-8 else total_w], dtype=mx.float32)
    weights = mx.array(w, dtype=mx.float32)
    out: list[mx.array] = []
    pool = streams()  # two blocks at a time, one per CPU stream (thread): both cores
    running: list[mx.array] = []
    for first in range(0, len(spans), len(pool)):
        ys = []
        for j in range(first, min(first + len(pool), len(spans))):
            r0, r1 = spans[j]
            with mx.stream(pool[j - first]):
                ds = [keep[i].block(j, r0, r1, xs[i], b, delta_of(i)[0]) for i in range(n_models)]
                ys.append(combine(b[r0:r1], scalars, weights, *ds))
        mx.async_eval(ys)  # queued behind the running pair: the cores never wait for Python
        out.extend(ys)
        mx.eval(running)  # then at most two pairs of blocks are in flight
        running = ys
    mx.eval(running)
    ds = ys = running = None
    y = mx.concatenate(out).reshape(shape)
    mx.eval(y)
    return y


def _magnitude_ks(sparsify: str, density: float, gamma: float, n: int) -> list[int]:
    """The top-k sizes of a magnitude mask: [k kept] or, for breadcrumbs, [n − n_bottom kept,
    n_top outliers dropped] (sparsify.py)."""
    if sparsify == "magnitude":
        return [int(density * n)]
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    return [n - n_bot] + ([n_top] if n_top > 0 else [])


def _keep(i, delta, magnitude, x, b, spans, shape, sparsify, density, gamma, epsilon, rescale,
          rescale_mode, keys, trim_scope, trim_thresholds, tops=None) -> _Keep:  # fmt: skip
    """Model ``i``'s ``_Keep``: the statistics passes of ``sparsify``'s mask and rescale.

    ``x``, ``b``: the model's and the base's stored-dtype inputs as (rows, cols)."""
    rule = _Keep()
    if sparsify == "none":
        return rule
    sp.check_density(density, sparsify)
    if sparsify == "magnitude" and trim_scope == "model":
        if trim_thresholds is None:
            raise ValueError("trim_scope='model' needs the model-wide trim_thresholds")
        thr = trim_thresholds[i]
        rule.mask = lambda j, r0, r1, d: mx.abs(d) >= thr
        return rule  # the TIES paper's model-wide trim: no rescale
    if density >= 1:
        return rule
    if sparsify == "della_magprune" and density <= 0:
        rule.zero = True
        return rule
    n = math.prod(shape)
    rows = spans[-1][1]
    p: object = density  # keep probability, for the inverse_p rescale
    if sparsify in ("magnitude", "magnitude_outliers"):
        ks = _magnitude_ks(sparsify, density, gamma, n)
        rule.tops = tops if tops is not None else top_ks(magnitude, spans, ks, n)
        kept, outliers = rule.tops[0], rule.tops[1] if len(ks) > 1 else None

        def mask(j, r0, r1, d):
            a = mx.abs(d)
            m = kept.mask(a, j)
            return m if outliers is None else m & ~outliers.mask(a, j)

        rule.mask = mask
    elif sparsify == "random":
        cols = n // rows

        def draw(r0, r1, key=keys[i]):  # counter-based: each block draws its own entries
            return sp.mask_entries(density, key, r0 * cols, r1 * cols).reshape(r1 - r0, cols)

        rule.draw = draw
    else:  # della_magprune: per-row rank probabilities (rows are independent), then a draw
        sp.check_della(density, epsilon)
        bits = bernoulli_bits(shape, keys[i]).reshape(rows, -1)
        mx.eval(bits)  # 4 bytes an entry, as bernoulli's own draw; p comes block by block

        def p(d):
            return sp.della_probabilities(d, density, epsilon)

        rule.mask = lambda j, r0, r1, d: bernoulli_of_bits(bits[r0:r1], p(d))
    if rescale and rescale_mode == "l1":
        rule.scale, masks = _l1_scale(spans, partial(_l1_parts, rule, delta, magnitude, x, b))
        rule.masks = masks or None  # top-k masks are cheap to redo: not kept
    elif rescale:
        rule.inverse_p = p
    if sparsify == "della_magprune":
        if rule.masks is None:  # cache the masks (a uint8 an entry) and drop the draw
            rule.masks = [rule.mask(j, r0, r1, delta(r0, r1)).astype(mx.uint8)
                          for j, (r0, r1) in enumerate(spans)]  # fmt: skip
            mx.eval(*rule.masks)
        rule.mask = None
    return rule
