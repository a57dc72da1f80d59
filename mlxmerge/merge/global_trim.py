"""The TIES paper's trim: one magnitude threshold per model over its whole task vector.

mergekit trims each tensor to its own top ``density``; the paper (prateeky2806/ties-merging)
keeps the top ``density`` of |δ| over the concatenation of every parameter of a model. The
exact k-th value over billions of entries is found in two streaming passes: a seeded sample
brackets it, then the entries inside the bracket (a tiny fraction) are gathered and ranked.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from mlxmerge.errors import RecipeError
from mlxmerge.merge.methods.common import kth_bracket

SAMPLE_SIZE = 1 << 18


def _abs_deltas(plan, p):
    base = plan.checkpoints[p.base[0]].get(p.base[1], mx.float32)
    for j, (i, n) in enumerate(p.inputs):
        d = mx.abs(plan.checkpoints[i].get(n, mx.float32) - base).reshape(-1)
        mx.eval(d)
        yield j, np.asarray(d)


def model_thresholds(plan, density: list[float]) -> list[float]:
    """Per merged model (in ``plan`` input order), the k-th largest |δ| over all its tensors."""
    tensors = [p for p in plan.tensors if p.base is not None and p.inputs]
    if not tensors:
        return []
    n_models = len(tensors[0].inputs)
    if any(len(p.inputs) != n_models for p in tensors):
        raise RecipeError("trim_scope: model needs the same models in every slice")
    total = sum(math.prod(p.shape) for p in tensors)
    rng = np.random.default_rng(0)
    samples: list[list[np.ndarray]] = [[] for _ in range(n_models)]
    for p in tensors:
        m = max(1, round(SAMPLE_SIZE * math.prod(p.shape) / total))
        for j, d in _abs_deltas(plan, p):
            samples[j].append(d[rng.integers(0, d.size, m)])
        mx.clear_cache()
    brackets = []
    for j in range(n_models):
        k = int(density[j] * total)
        if k <= 0:
            brackets.append((np.inf, np.inf, 0))
            continue
        lo, hi = kth_bracket(np.sort(np.concatenate(samples[j])), k, total)
        brackets.append((lo, hi, k))
    above = [0] * n_models
    bands: list[list[np.ndarray]] = [[] for _ in range(n_models)]
    for p in tensors:
        for j, d in _abs_deltas(plan, p):
            lo, hi, _ = brackets[j]
            above[j] += int(np.count_nonzero(d > hi))
            bands[j].append(d[(d >= lo) & (d <= hi)].copy())
        mx.clear_cache()
    out = []
    for j, (lo, hi, k) in enumerate(brackets):
        if k == 0:
            out.append(np.inf)
            continue
        band = np.concatenate(bands[j])
        need = k - above[j]
        if not 0 < need <= band.size:  # a six-sigma miss: rank every entry instead
            every = np.concatenate(
                [d for p in tensors for jj, d in _abs_deltas(plan, p) if jj == j]
            )
            out.append(float(np.partition(every, every.size - k)[every.size - k]))
            continue
        out.append(float(np.partition(band, band.size - need)[band.size - need]))
    return out
