"""Machinery shared by the compiled forms: block-summed statistics and the block size."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from mlxmerge.merge.methods.common import (
    compiled,
    fsum,
    group_sums,
    streams,
)

BLOCK_ENTRIES = 1 << 21  # entries per statistics block: 8 MB per float32 temporary


def norms_and_dot(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(‖a‖, ‖b‖, a·b) in float32 of two same-shape tensors of any float dtype, accurate to
    float32 rounding like ``common.norm``/``common.dot``, with float32 temporaries of one block."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    product = _delta_product_kernel(False)
    terms = [(product, [fa, fa], []), (product, [fb, fb], []), (product, [fa, fb], [])]
    aa, bb, ab = block_sums(terms, fa.size)
    return mx.sqrt(aa), mx.sqrt(bb), ab


# --- shared machinery of the forms below -----------------------------------------------------


def block_sums(terms: Sequence[tuple], n: int) -> list[mx.array]:
    """Whole-tensor sums of several elementwise float32 products, one block at a time.

    ``terms``: ``(kernel, flats, scalars)`` each; ``kernel(*scalars, *blocks)`` returns one
    float32 block, ``blocks`` being the same ``BLOCK_ENTRIES`` span of every 1-D array in
    ``flats`` (``n`` entries each). Every sum is accurate to float32 rounding like ``fsum``
    (1024-entry groups through ``common.group_sums``, then ``fsum`` of the group sums).
    """
    parts: list[list[mx.array]] = [[] for _ in terms]
    pair = streams()
    starts = list(range(0, n, BLOCK_ENTRIES))
    for first in range(0, len(starts), len(pair)):  # two blocks at once, one per stream
        for acc, (kernel, flats, scalars) in zip(parts, terms):
            for k, s in enumerate(starts[first : first + len(pair)]):
                with mx.stream(pair[k]):
                    blocks = (f[s : s + BLOCK_ENTRIES] for f in flats)
                    acc.append(group_sums(kernel(*scalars, *blocks)))
            mx.eval(acc[first:])  # two float32 blocks alive at a time, however many terms
    return [fsum(mx.concatenate(p)) for p in parts]


def _f32(value) -> mx.array:
    return mx.array(value, dtype=mx.float32)


def _flat(xs: Sequence[mx.array | None]) -> list[mx.array | None]:
    return [None if x is None else x.reshape(-1) for x in xs]


def _row_spans(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_ENTRIES // max(cols, 1))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


FUSED_MODELS = 4  # above this many models, the last kernels are too deep for compile to fuse


def _final(kernel, scalars: Sequence[mx.array], arrays: Sequence[mx.array], n: int) -> mx.array:
    """``kernel(*scalars, *arrays)`` evaluated; over more than ``FUSED_MODELS`` models, per
    ``BLOCK_ENTRIES`` span of the flattened arrays and concatenated. compile cuts a long chain
    of ops into several kernels whose intermediates would be whole float32 tensors; over
    blocks they are block-sized."""
    if n <= FUSED_MODELS:
        y = kernel(*scalars, *arrays)
        mx.eval(y)
        return y
    flats = _flat(arrays)
    out = []
    for s in range(0, flats[0].size, BLOCK_ENTRIES):
        out.append(kernel(*scalars, *(f[s : s + BLOCK_ENTRIES] for f in flats)))
        mx.eval(out[-1])
    return mx.concatenate(out).reshape(arrays[0].shape)


def _delta(x: mx.array, base: mx.array | None) -> mx.array:
    """x in float32, minus base when there is one (a task vector), inside a kernel."""
    return x.astype(mx.float32) if base is None else x.astype(mx.float32) - base.astype(mx.float32)


def _delta_product_kernel(with_base: bool):
    # (x - base)·(y - base) per entry (or x·y without a base): the terms of norms and dots.
    def build():
        if with_base:
            return lambda x, y, b: _delta(x, b) * _delta(y, b)
        return lambda x, y: x.astype(mx.float32) * y.astype(mx.float32)

    return compiled(("dprod", with_base), build)


def _delta_gram(xs: Sequence[mx.array], base: mx.array | None, pairs) -> list[mx.array]:
    """Block-summed (xᵢ − base)·(xⱼ − base) over whole tensors for each (i, j) in ``pairs``."""
    flat = _flat([*xs, base])
    kernel = _delta_product_kernel(base is not None)
    tail = [flat[-1]] if base is not None else []
    terms = [(kernel, [flat[i], flat[j], *tail], []) for i, j in pairs]
    return block_sums(terms, flat[0].size)
