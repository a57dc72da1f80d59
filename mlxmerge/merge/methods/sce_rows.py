"""SCE over row blocks of a large tensor: the result of ``task_arithmetic.sce``, less memory.

``sce`` holds the variance, the selection and a float32 task vector per model for the whole
tensor. Here the inputs stay in their stored dtype and every float32 temporary lives for one
block of rows:

1. with 0 < select_topk < 1, one pass counts the positions where the variance over models is
   ≠ 0 and gathers the variances inside a bracket, from a sample, around the
   int(count·select_topk)-th largest (widened by the sample's uncertainty on the count); the
   exact threshold is ranked from them (``block_stats.TopK``: ties kept in row-major order);
2. the energies mean(τᵢ²) of the selected task vectors from per-block level-1 partial sums
   that ``common.fsum`` finishes exactly as it would have (``block_stats.level1``), and the
   selection kept as one bool per entry;
3. per block: ``sce``'s own compiled erase-and-mean kernel, cast to the output dtype at once.

Each block runs the same operations (the same compiled kernels) as the whole-tensor function,
so results are equal bit for bit (``tests/merge/test_sce_rows.py``).
Paper: FuseChat, arXiv:2408.07990.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from mlxmerge.merge.methods import row_blocks
from mlxmerge.merge.methods.block_stats import TopK, block_spans, finish_fsum, level1, top_ks
from mlxmerge.merge.methods.common import kth_bracket, sample_indices
from mlxmerge.merge.methods.task_arithmetic import (
    sce_kernel,
    sce_square,
    sce_variance,
    sce_weights,
)


def blocked(
    tensors: Sequence[mx.array],
    base: mx.array | None,
    out_dtype: mx.Dtype,
    *,
    select_topk: float = 1.0,
    block_entries: int | None = None,
    **_ignored,
) -> mx.array | None:
    """``sce(tensors, base, select_topk=...)`` cast to ``out_dtype``, in row blocks.

    ``tensors`` and ``base``: the inputs in their stored dtype, all of one shape (rows, ...).
    Returns the evaluated output, or None (``MethodSpec.blocked``: the caller runs ``sce``)
    for a small or 1-D tensor, no models, or an invalid ``select_topk`` (``sce`` raises).
    """
    if base is None or not tensors:
        return None
    shape = tuple(base.shape)
    if len(shape) < 2 or math.prod(shape) < row_blocks.MIN_ENTRIES:
        return None
    if isinstance(select_topk, bool) or not isinstance(select_topk, (int, float)):
        return None
    if not 0 <= select_topk <= 1:
        return None
    rows, n = shape[0], math.prod(shape)
    spans = block_spans(rows, n // rows, block_entries or row_blocks.BLOCK_ENTRIES)
    xs = [t.reshape(rows, -1) for t in tensors]
    b = base.reshape(rows, -1)
    variance = sce_variance(len(xs))

    def var_of(span, idx):
        if idx is not None:  # a gather of entries (the threshold's sample)
            gather = row_blocks.gather_f32  # NumPy: ~5x faster than mx.take here
            return variance(mx.array(gather(b, idx)), *[mx.array(gather(x, idx)) for x in xs])
        r0, r1 = span
        return variance(b[r0:r1], *[x[r0:r1] for x in xs])

    top = None
    if select_topk <= 0:
        top = top_ks(None, spans, [0], n)[0]  # nothing selected: no statistics needed
    elif select_topk < 1:
        top = _selection(var_of, spans, n, select_topk)

    masks: list[mx.array] = []  # the selection, one bool per entry, for the combine pass
    partial: list[list[mx.array]] = [[] for _ in xs]
    everything = mx.array(True)
    for r0, r1 in spans:
        if top is not None:
            masks.append(top.mask(var_of((r0, r1), None), len(masks)))
        keep = masks[-1] if top is not None else everything
        parts = [level1(sce_square(keep, x[r0:r1], b[r0:r1])) for x in xs]
        mx.eval(*parts, keep)
        for i, p in enumerate(parts):
            partial[i].append(p)
    energy = mx.stack([finish_fsum(p) / n for p in partial])  # mean τᵢ², (n_models,)
    w = sce_weights(energy)
    kernel = sce_kernel(len(xs))
    out = []
    for j, (r0, r1) in enumerate(spans):
        keep = masks[j] if top is not None else everything
        y = kernel(b[r0:r1], w, keep, *[x[r0:r1] for x in xs]).astype(out_dtype)
        mx.eval(y)
        out.append(y)
    y = mx.concatenate(out).reshape(shape)
    mx.eval(y)
    return y


def _selection(var_of, spans, n: int, select_topk: float):
    """The ``TopK`` of the int(nnz(var)·select_topk) largest variances, in one pass.

    The count of nonzero variances is known only after the pass, so the bracket spans the k of
    the sample's nonzero fraction ± six standard deviations; a miss falls back to ``top_ks``.
    """
    sample = np.asarray(var_of(None, sample_indices(n)))
    m = sample.size
    f = np.count_nonzero(sample) / m
    spread = 6.0 * math.sqrt(max(f * (1 - f), 1.0 / n) / m) + 2.0 / m
    k_few = max(1, int(max(0.0, f - spread) * n * select_topk))
    k_many = max(1, int(min(1.0, f + spread) * n * select_topk))
    lo, hi = kth_bracket(sample, k_many, n)[0], kth_bracket(sample, k_few, n)[1]
    nonzero = above = 0
    bands = []
    for span in spans:
        v = var_of(span, None).reshape(-1)
        counts = mx.sum(v != 0), mx.sum(v > float(hi))
        mx.eval(v, *counts)
        a = np.asarray(v)
        bands.append(a[(a >= lo) & (a <= hi)])
        nonzero += int(counts[0].item())
        above += int(counts[1].item())
    k = int(nonzero * select_topk)
    band = np.concatenate(bands)
    need = k - above
    if not 0 < k < n or not 0 < need <= band.size:  # k outside (0, n), or a miss
        return top_ks(var_of, spans, [k], n)[0]
    thr = float(np.partition(band, band.size - need)[band.size - need])
    equal = [int(np.count_nonzero(v == thr)) for v in bands]  # thr lies in the band
    return TopK(thr, above + int(np.count_nonzero(band > thr)), equal, k)
