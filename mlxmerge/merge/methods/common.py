"""Small float32 helpers shared by the merge methods: reductions, exact top-k masks, argument checks."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from mlxmerge.errors import RecipeError


def per_model(value, n: int, name: str) -> list:
    """A per-model parameter as a list of length ``n`` (a scalar is repeated)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise RecipeError(f"Parameter {name!r} has {len(value)} values for {n} models.")
        return list(value)
    return [value] * n


def check_shapes(tensors: Sequence[mx.array], base: mx.array | None) -> tuple[int, ...]:
    """The common shape of the inputs; the runner crops/rectifies before calling a method."""
    shapes = {tuple(x.shape) for x in tensors}
    if base is not None:
        shapes.add(tuple(base.shape))
    if len(shapes) != 1:
        raise ValueError(f"merge method inputs have different shapes: {sorted(shapes)}")
    return shapes.pop()


class ConsumableInputs(list):
    """Input tensors a method may drop once it no longer needs them.

    The runner passes its inputs in this list (and keeps no other reference), so a method that
    turns each input into a task vector can release the input's float32 copy right away: for
    TIES/DARE that lowers peak memory by one fp32 tensor per model. Plain lists are never touched.
    """


def release(tensors: Sequence, i: int) -> None:
    """Drop ``tensors[i]`` if the caller allowed it (see ``ConsumableInputs``)."""
    if isinstance(tensors, ConsumableInputs):
        tensors[i] = None


BLOCK = 1024

_COMPILED: dict[tuple, object] = {}


def compiled(key: tuple, build):
    """``mx.compile(build())``, built once per ``key`` (keys name the kernel first); the merge
    methods' kernels are traced once and reused for every tensor."""
    if key not in _COMPILED:
        _COMPILED[key] = mx.compile(build())
    return _COMPILED[key]


_STREAMS = threading.local()


def streams() -> list:
    """Two streams on the default device, made once per thread (an MLX stream belongs to the
    thread that made it). On the CPU each stream runs on a thread of its own, so independent
    blocks evaluated together use two cores (same results as one stream)."""
    pair = getattr(_STREAMS, "pair", None)
    if pair is None:
        pair = _STREAMS.pair = [mx.new_stream(mx.default_device()) for _ in range(2)]
    return pair


GROUP_COLUMNS = 64  # group sums come from chunks of (BLOCK, GROUP_COLUMNS) entries
CHUNK = BLOCK * GROUP_COLUMNS


def group_sums(flat: mx.array) -> mx.array:
    """One level of ``fsum``: sums of 1024-entry groups of a 1-D float32 array.

    Each ``CHUNK`` of 65,536 consecutive entries, seen as a (1024, 64) matrix, gives its 64
    column sums (MLX adds the rows in order, vectorized across columns: ~4.5x faster on the
    CPU than summing contiguous 1024-entry rows, and a column's sum does not depend on how many
    chunks one call gets, so row blocks aligned to chunks give the whole tensor's sums bit for
    bit). The entries after the last whole chunk are summed as contiguous 1024-entry groups.
    """
    n = flat.size
    m = n // CHUNK * CHUNK
    parts = [mx.sum(flat[:m].reshape(-1, BLOCK, GROUP_COLUMNS), axis=1).reshape(-1)] if m else []
    tail = flat[m:]
    if tail.size:
        t = tail.size // BLOCK * BLOCK
        if t:
            parts.append(mx.sum(tail[:t].reshape(-1, BLOCK), axis=1))
        if t < tail.size:
            parts.append(mx.sum(tail[t:])[None])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def fsum(x: mx.array) -> mx.array:
    """Sum of all entries in float32, reduced in blocks of 1024 per level (``group_sums``).

    A flat ``mx.sum`` over millions of float32 entries loses ~1e-3 relative accuracy on the
    CPU; block-wise partial sums keep the error near 1e-7 (``benchmarks/bench_methods.py``).
    """
    flat = x.reshape(-1)
    while flat.size > BLOCK:
        flat = group_sums(flat)
    return mx.sum(flat)


def dot(a: mx.array, b: mx.array) -> mx.array:
    """Σ a·b over the whole tensors (blocked float32 reduction)."""
    return fsum(a * b)


def norm(a: mx.array) -> mx.array:
    """Frobenius norm of the whole tensor."""
    return mx.sqrt(fsum(a * a))


def l1(a: mx.array) -> mx.array:
    """Σ |a| over the whole tensor."""
    return fsum(mx.abs(a))


EXACT_PARTITION_BELOW = 1 << 20
SAMPLE_SIZE = 1 << 16


def sample_indices(n: int) -> np.ndarray:
    """``SAMPLE_SIZE`` seeded uniform positions in ``range(n)`` (int64), ascending: gathered in
    memory order, a sample of a large tensor costs a third of the same positions unsorted."""
    if n not in _SAMPLES:
        if len(_SAMPLES) > 64:
            _SAMPLES.clear()
        _SAMPLES[n] = np.sort(np.random.default_rng(0).integers(0, n, SAMPLE_SIZE))
    return _SAMPLES[n]


_SAMPLES: dict[int, np.ndarray] = {}


def kth_bracket(sample: np.ndarray, k: int, n: int) -> tuple[float, float]:
    """[lo, hi] holding the k-th largest of ``n`` values, from a uniform sample of them (any
    order: the two order statistics come from one ``np.partition``, no sort).

    The margin is six binomial standard deviations of the sample quantile (plus two ranks), so
    the k-th value falls outside only with negligible probability; callers verify and fall back.
    """
    m = sample.size
    q = 1.0 - k / n  # the answer is the q-quantile
    margin = 6.0 * math.sqrt(max(q * (1 - q), 1.0 / n) / m) + 2.0 / m
    lo_i, hi_i = math.floor((q - margin) * m), math.ceil((q + margin) * m)
    inside = [i for i in (lo_i, hi_i) if 0 <= i < m]
    ranked = np.partition(sample, inside) if inside else sample
    lo = ranked[lo_i] if lo_i >= 0 else -np.inf
    hi = ranked[hi_i] if hi_i < m else np.inf
    return lo, hi


def kth_largest(flat: mx.array, k: int) -> float:
    """The ``k``-th largest entry of a 1-D array, exactly, in a few linear passes.

    A full ``mx.partition`` of a 10⁸-entry tensor costs seconds. A seeded sample brackets the
    answer in a narrow band [lo, hi]; one pass counts the entries above hi and gathers those in
    the band, and only the band (~0.1% of the entries) is partitioned. If the bracket misses (it
    should not: the margin is six standard deviations), the full partition is the fallback.
    """
    n = flat.size
    if n <= EXACT_PARTITION_BELOW:
        return mx.partition(flat, n - k)[n - k].item()
    a = np.asarray(mx.contiguous(flat.astype(mx.float32)))  # CPU view of unified memory
    sample = a[sample_indices(n)]
    lo, hi = kth_bracket(sample, k, n)
    n_above = int(mx.sum(flat > float(hi)).item())
    band = a[(a >= lo) & (a <= hi)]
    need = k - n_above
    if 0 < need <= band.size:
        return float(np.partition(band, band.size - need)[band.size - need])
    return mx.partition(flat, n - k)[n - k].item()


def top_k_mask(score: mx.array, k: int) -> mx.array:
    """Boolean mask of exactly the ``k`` largest entries of ``score`` (any shape).

    Uses a k-th value threshold found with ``mx.partition`` (O(n), no full sort). Entries equal
    to the threshold are kept in flat (row-major) order until exactly ``k`` are kept, so the
    result matches a stable descending sort. Evaluates the threshold (one sync) to skip the
    tie-breaking cumsum when nothing ties.
    """
    n = score.size
    if k >= n:
        return mx.ones(score.shape, dtype=mx.bool_)
    if k <= 0:
        return mx.zeros(score.shape, dtype=mx.bool_)
    flat = score.reshape(-1)
    thr = kth_largest(flat, k)
    above = flat > thr
    equal = flat == thr
    room = k - mx.sum(above.astype(mx.int32))
    n_equal = mx.sum(equal.astype(mx.int32))
    mx.eval(room, n_equal)
    if n_equal.item() <= room.item():  # the usual case: no ties at the threshold
        return (above | equal).reshape(score.shape)
    keep = above | (equal & (mx.cumsum(equal.astype(mx.int32)) <= room))
    return keep.reshape(score.shape)


def check_unit_interval(value: float, name: str, low_open: bool = False) -> None:
    """Raise a RecipeError unless ``value`` is a number in [0, 1] ((0, 1] when low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"Parameter {name!r} must be a number, got {value!r}.")
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        bounds = "(0, 1]" if low_open else "[0, 1]"
        raise RecipeError(f"Parameter {name!r} must lie in {bounds}, got {value}.")


def check_choice(value: str, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise RecipeError(f"Parameter {name!r} must be one of {', '.join(choices)}; got {value!r}.")
