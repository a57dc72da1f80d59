"""Per-tensor statistics over row blocks, shared by the row-blocked merges.

``block_spans`` cuts a tensor's rows into blocks aligned with ``common.fsum``'s groups;
``level1``/``finish_fsum`` give ``fsum`` of the whole tensor from per-block partial sums;
``top_ks``/``TopK`` find exact top-k thresholds from a sample and one band pass and mask block
by block with ``top_k_mask``'s row-major tie-breaking; ``bernoulli_bits`` is the draw behind
``mx.random.bernoulli``, for masks whose probabilities come block by block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlxmerge.merge.methods.common import (
    BLOCK,
    CHUNK,
    fsum,
    group_sums,
    kth_bracket,
    sample_indices,
)

Score = Callable[[tuple[int, int] | None, mx.array | None], mx.array]
"""``score(span, idx)``: a float32 score of the rows ``span`` (shape (r1 - r0, cols)), or of
the flat entries ``idx`` (a gather) when ``span`` is None."""


def block_spans(rows: int, cols: int, entries: int) -> list[tuple[int, int]]:
    """Row ranges of about ``entries`` entries each, in order, covering ``rows``.

    Blocks hold whole ``common.CHUNK``s of entries where a few of them fit in ``entries``, so
    their ``level1`` sums are the whole tensor's; else whole 1024-entry groups (then the sums
    agree to float32 rounding).
    """
    unit = CHUNK // math.gcd(cols, CHUNK)
    if unit * cols > 4 * entries:
        unit = BLOCK // math.gcd(cols, BLOCK)
    step = max(unit, entries // cols // unit * unit)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def level1(a: mx.array) -> mx.array:
    """``fsum``'s first level (``group_sums``) of one block."""
    return group_sums(a.reshape(-1))


def finish_fsum(parts: list[mx.array]) -> mx.array:
    """``fsum`` of the whole tensor from its blocks' ``level1`` sums (blocks in order)."""
    return fsum(mx.concatenate(parts))


class TopK:
    """The ``k`` largest entries of a score, block by block (``common.top_k_mask``).

    ``thr`` is the k-th largest score; of the entries equal to it, the first ``k − above`` in
    row-major order are kept, as the whole-tensor mask keeps them. From each block's count of
    equal entries the block where that room runs out (``cut``) is known in advance: blocks
    before it keep score ≥ thr, blocks after it score > thr, and only the cut block ranks its
    equal entries (a cumsum).
    """

    def __init__(self, thr: float, n_above: int, equal_per_block: Sequence[int], k: int):
        self.thr = thr
        room, seen = k - n_above, 0
        self.cut, self.left = len(equal_per_block), 0  # no cut: every equal entry is kept
        for j, e in enumerate(equal_per_block):
            if seen + e > room:
                self.cut, self.left = j, room - seen
                break
            seen += e

    def bound(self, j: int) -> tuple[float, bool] | None:
        """(thr, inclusive) when block ``j`` keeps score ≥ thr (True) or > thr (False), else None."""
        if j == self.cut and self.left > 0:
            return None
        return self.thr, j < self.cut

    def mask(self, a: mx.array, j: int) -> mx.array:
        """Block ``j``'s keep mask from its scores ``a``."""
        got = self.bound(j)
        if got is not None:
            return a >= self.thr if got[1] else a > self.thr
        equal = (a == self.thr).reshape(-1)
        tie = equal & (mx.cumsum(equal.astype(mx.int32)) <= self.left)
        return (a > self.thr) | tie.reshape(a.shape)


class _Every(TopK):
    """k >= n: every entry (``top_k_mask``'s shortcut)."""

    def __init__(self):
        super().__init__(-math.inf, 0, [], 0)
        self.cut = 1 << 62  # score ≥ −inf in every block


class _NoEntry(TopK):
    """k <= 0: no entry."""

    def __init__(self):
        super().__init__(math.inf, 0, [], 0)
        self.cut = -1  # score > +inf in every block


def top_ks(score: Score, spans, ks: Sequence[int], n: int) -> list[TopK]:
    """A ``TopK`` for each of ``ks``, all from one sample and one pass over the blocks.

    A seeded sample brackets each k-th largest score; the pass counts the entries above each
    bracket and gathers those inside, and only those are ranked. A bracket that misses (six
    standard deviations: it should not) falls back to ranking every entry.
    """
    return top_ks_many([score], spans, [ks], n)[0]


def top_ks_many(scores: Sequence[Score], spans, ks: Sequence[Sequence[int]], n: int):
    """``top_ks`` of several scores (one per model) in one pass over the blocks: MLX computes
    every model's block of scores, then NumPy counts and gathers each model's brackets in a
    thread of its own (NumPy releases the GIL), so two models use both cores."""
    from concurrent.futures import ThreadPoolExecutor

    inside = [[k for k in kk if 0 < k < n] for kk in ks]
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = _top_ks(scores, spans, inside, n, pool)
    return [
        [f[k] if k in f else (_Every() if k >= n else _NoEntry()) for k in kk]
        for f, kk in zip(found, ks)
    ]


def _top_ks(scores, spans, ks, n: int, pool) -> list[dict[int, TopK]]:
    idx = sample_indices(n)
    brackets = [[kth_bracket(np.asarray(score(None, idx)), k, n) for k in kk] if kk else []
                for score, kk in zip(scores, ks)]  # fmt: skip
    above = [[0] * len(kk) for kk in ks]
    bands: list[list[list[np.ndarray]]] = [[[] for _ in kk] for kk in ks]

    def scan(m: int, v: np.ndarray) -> list[tuple[int, np.ndarray]]:
        return [(int(np.count_nonzero(v > hi)), np.compress((v >= lo) & (v <= hi), v))
                for lo, hi in brackets[m]]  # fmt: skip

    def collect(futures) -> None:
        for m, f in futures:
            for j, (count, band) in enumerate(f.result()):
                above[m][j] += count
                bands[m][j].append(band)

    todo = [m for m in range(len(scores)) if ks[m]]

    def block(span):
        a = [scores[m](span, None).reshape(-1) for m in todo]
        mx.async_eval(a)
        return a

    # MLX scores block j+1 while NumPy scans block j (two threads): three workers, two cores
    pending, current, following = [], [], block(spans[0]) if spans else []
    for j in range(len(spans)):
        current, following = following, block(spans[j + 1]) if j + 1 < len(spans) else []
        pending.append([(m, pool.submit(scan, m, np.asarray(a))) for m, a in zip(todo, current)])
        if len(pending) > 2:  # bounded: a few blocks' scores alive at once
            collect(pending.pop(0))
    for futures in pending:
        collect(futures)
    del current, following, pending

    def rank(m: int, j: int, k: int, every=None) -> TopK:
        if every is not None:  # a six-sigma miss: rank every entry
            flat = np.concatenate(every)
            thr = float(np.partition(flat, flat.size - k)[flat.size - k])
            equal = [int(np.count_nonzero(v == thr)) for v in every]
            return TopK(thr, int(np.count_nonzero(flat > thr)), equal, k)
        band = np.concatenate(bands[m][j])
        need = k - above[m][j]
        thr = float(np.partition(band, band.size - need)[band.size - need])
        equal = [int(np.count_nonzero(v == thr)) for v in bands[m][j]]  # thr lies in the band
        return TopK(thr, above[m][j] + int(np.count_nonzero(band > thr)), equal, k)

    jobs = [(m, j, k) for m in todo for j, k in enumerate(ks[m])]
    misses = {(m, j) for m, j, k in jobs
              if not 0 < k - above[m][j] <= sum(map(len, bands[m][j]))}  # fmt: skip
    every = {
        m: [np.asarray(scores[m](s, None).reshape(-1)) for s in spans]
        for m in {m for m, _ in misses}
    }  # fmt: skip  (MLX: this thread)
    ranked = pool.map(lambda job: rank(*job, every.get(job[0]) if job[:2] in misses else None),
                      jobs)  # fmt: skip
    found: list[dict[int, TopK]] = [{} for _ in scores]
    for (m, _, k), t in zip(jobs, ranked):
        found[m][k] = t
    return found


# mx.random.bernoulli(p, shape, key) is bits < p · (2³² rounded up to the next float32), with
# bits = the key's uint32 draw of that shape (mlx/random.cpp), which randint over [0, 2³²) in
# uint32 returns as drawn. Drawing the bits once and comparing block by block gives the same mask.
_BERNOULLI_UPPER = mx.array(np.nextafter(np.float32(2**32 - 1), np.float32(np.inf)))


def bernoulli_bits(shape: tuple[int, ...], key: mx.array) -> mx.array:
    """The uint32 draw behind ``mx.random.bernoulli(p, shape, key=key)``."""
    return mx.random.randint(0, 2**32, shape, dtype=mx.uint32, key=key)


def bernoulli_of_bits(bits: mx.array, p: mx.array) -> mx.array:
    """``mx.random.bernoulli(p, ...)``'s mask from its ``bernoulli_bits`` (any matching slice)."""
    return bits < p * _BERNOULLI_UPPER
