"""SCE over row blocks of a large tensor: the same bits as ``task_arithmetic.sce``, less memory.

``sce`` stacks every task vector τᵢ = xᵢ − base in float32 and adds the variance, the masks and
the weighted products on top: ≈ 8× the tensor in float32 at peak. Here the inputs stay in their
stored dtype and every float32 temporary lives for one block of rows:

1. with 0 < select_topk < 1: count the positions where var over models ≠ 0, then find the
   int(count·select_topk)-th largest variance from a sample and one band pass
   (``row_blocks.top_ks``);
2. the energies mean(τᵢ²) of the selected task vectors from per-block level-1 partial sums
   that ``common.fsum`` finishes exactly as it would have (``row_blocks.level1``), with the
   keep masks of step 1 kept, one bool per entry;
3. per block: the sign election and weighted mean in ``sce``'s own compiled kernel, cast to
   the output dtype at once.

Each block runs the same operations as the whole-tensor function, so results are equal bit
for bit (``tests/merge/test_sce_rows.py``). Paper: FuseChat, arXiv:2408.07990.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx

from mlxmerge.merge.methods import row_blocks
from mlxmerge.merge.methods.row_blocks import block_spans, finish_fsum, level1, top_ks
from mlxmerge.merge.methods.task_arithmetic import sce_kernel, sce_weights


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
    spans = block_spans(rows, n // rows, block_entries)
    xs = [t.reshape(rows, -1) for t in tensors]
    b = base.reshape(rows, -1)

    def task_vectors(r0, r1):  # (n_models, r1 - r0, cols)
        return mx.stack([x[r0:r1].astype(mx.float32) - b[r0:r1].astype(mx.float32) for x in xs])

    top = _selection(xs, b, spans, n, select_topk, task_vectors) if select_topk < 1 else None
    masks: list[mx.array] = []  # the selection, one bool per entry, for the combine pass
    partial: list[list[mx.array]] = [[] for _ in xs]
    for r0, r1 in spans:
        tv = task_vectors(r0, r1)
        if top is not None:
            masks.append(top.mask(mx.var(tv, axis=0)))
            tv = mx.where(masks[-1], tv, 0.0)
        parts = [level1(t * t) for t in tv]
        mx.eval(*parts, *masks[-1:])
        for i, p in enumerate(parts):
            partial[i].append(p)
    energy = mx.stack([finish_fsum(p) / n for p in partial])  # mean τᵢ², (n_models,)
    w = sce_weights(energy)
    kernel = sce_kernel(len(xs))
    out = []
    for j, (r0, r1) in enumerate(spans):
        bj = b[r0:r1].astype(mx.float32)
        tv = [x[r0:r1].astype(mx.float32) - bj for x in xs]
        if top is not None:
            tv = [mx.where(masks[j], t, 0.0) for t in tv]
        y = kernel(bj, w, *tv).astype(out_dtype)
        mx.eval(y)
        out.append(y)
    y = mx.concatenate(out).reshape(shape)
    mx.eval(y)
    return y


def _selection(xs, b, spans, n, select_topk, task_vectors):
    """The ``TopK`` of the int(nnz(var)·select_topk) positions of largest variance over models."""
    if select_topk <= 0:
        return top_ks(None, spans, [0], n)[0]  # nothing selected (no statistics needed)

    def variance(span, idx):
        if idx is not None:  # a gather of entries (the threshold's sample)
            flat_b = b.reshape(-1)
            tv = mx.stack([mx.take(x.reshape(-1), idx).astype(mx.float32)
                           - mx.take(flat_b, idx).astype(mx.float32) for x in xs])  # fmt: skip
            return mx.var(tv, axis=0)
        return mx.var(task_vectors(*span), axis=0)

    nonzero = 0
    for span in spans:
        nonzero += int(mx.sum(variance(span, None) != 0).item())
    top = top_ks(variance, spans, [int(nonzero * select_topk)], n)[0]
    top.start()
    return top
