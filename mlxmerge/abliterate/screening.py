"""First stage of the direction search: rank every candidate from two gradient passes.

Measuring one (layer, position) candidate exactly costs three forward passes over the validation
prompts (``directions.score_candidates``); a 30-layer model has ~140 candidates. Here all of them
are scored at once by a first-order (attribution-patching) estimate, the idea of Nanda 2023 and
Syed et al. 2023 (arXiv 2310.10348) applied to Arditi's ablation. Ablating a unit direction r
with strength λ changes every residual writer's output y into y − λ r (rᵀy), so a scalar f of
the model's output changes by

    Δf ≈ −λ Σ_{writers, positions} (gᵀr)(rᵀy),      g = ∂f/∂y.

For K candidates R = [r_1 … r_K] each writer returns y + ((yR) ⊙ a) Rᵀ with a = 0 (the same
output); then ∂f/∂a_k is that sum for r_k, and one backward pass gives all K at once.

* ``bypass``: f = the mean refusal log-odds on harmful prompts; estimate f₀ − λ ∂f/∂a_k.
* ``kl``: the Fisher approximation KL(p ‖ p_Δ) ≈ ½ E_{y∼p}[(Δ log p(y))²], with one next token
  per harmless prompt drawn from the base model (seeded), and Δ log p(y) ≈ −λ ∂ log p(y)/∂a_k
  per prompt (a per-prompt a).

Stacked MoE experts whose outputs mlx-lm sorts by expert (``SwitchGLU``) have rows that are not
prompts; they are left out of the per-prompt KL sums (not of the refusal estimate). Both are
estimates; the best few candidates are then measured exactly (``score_candidates``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxmerge.abliterate.hooks import Instrumented, writer_direction
from mlxmerge.lm.generate import (
    batches,
    can_share_prefix,
    forward,
    forward_after_prefix,
    make_batch_cache,
    pad_left,
    shared_prefix_length,
)
from mlxmerge.lm.logprobs import log_softmax


@dataclass
class Screened:
    layer: int  # residual point the direction comes from
    position: int  # negative index into the prompt
    bypass: float  # estimated mean refusal log-odds on harmful prompts after ablation
    kl: float  # estimated mean first-token KL(base ‖ ablated) on harmless prompts


def _gradients(
    inst: Instrumented, R: mx.array, token_lists: Sequence[Sequence[int]],
    objective: Callable[[mx.array, int], mx.array], *, per_prompt: bool, lam: Sequence[float],
    pad_id: int, batch_size: int, progress: Callable[[int], None] | None,
) -> tuple[float, np.ndarray]:  # fmt: skip
    """Σ over prompts of f (a float) and ∂f/∂a: (K,) summed, or (n_prompts, K) per prompt."""
    K = R.shape[1]
    wrappers = []
    for i, found in enumerate(inst.writers):
        for _, _, w in found:
            if lam[i]:  # writers the edit leaves alone do not move
                wrappers.append((w, writer_direction(R, w)))
    total, grads = 0.0, [None] * len(token_lists)
    summed = np.zeros(K)
    p = shared_prefix_length(token_lists)
    shared = p >= 4 and can_share_prefix(inst.model)
    for b, idx in enumerate(batches(token_lists, batch_size, inst.model)):
        rows = [token_lists[i] for i in idx]

        def f(a, rows=rows, b=b):
            for w, rw in wrappers:
                w.slot.screen = (rw.astype(mx.float32), a)
            if shared:  # the shared prefix once (its gradient flows through the tiled cache)
                z = forward_after_prefix(inst.model, rows[0][:p], [t[p:] for t in rows],
                                         pad_id=pad_id)  # fmt: skip
            else:
                tokens, padding = pad_left(rows, pad_id)
                z = forward(inst.model, tokens, make_batch_cache(inst.model, padding))[:, -1, :]
            return objective(z.astype(mx.float32), b)

        a0 = mx.zeros((len(idx), K) if per_prompt else (K,))
        value, g = mx.value_and_grad(f)(a0)
        mx.eval(value, g)
        for w, _ in wrappers:
            w.slot.screen = None
        total += value.item()
        g = np.asarray(g, dtype=np.float64)
        if per_prompt:
            for j, i in enumerate(idx):
                grads[i] = g[j]
        else:
            summed += g
        mx.clear_cache()
        if progress:
            progress(len(idx))
    return total, (np.stack(grads) if per_prompt else summed)


def screen_candidates(
    inst: Instrumented, diffs: np.ndarray, candidates: Sequence[tuple[int, int]],
    harmful_val: list[list[int]], harmless_val: list[list[int]], refusal_ids: Sequence[int], *,
    edit_layers: Sequence[int], strength: float = 1.0, pad_id: int = 0, batch_size: int = 16,
    seed: int = 0, progress: Callable[[int], None] | None = None,
) -> list[Screened]:  # fmt: skip
    """First-order estimates of bypass and KL for every (layer, position index) candidate.

    ``diffs`` (L+1, P, d); ``candidates`` hold non-negative position indices into P; the returned
    positions are negative (p − P), as in ``Candidate``. Costs one forward and one backward pass
    over each validation set, whatever the number of candidates.
    """
    from mlxmerge.abliterate.directions import refusal_score, unit_np

    n_pos = diffs.shape[1]
    R = mx.array(np.stack([unit_np(diffs[l, p]) for l, p in candidates], axis=1).astype(np.float32))
    keep = set(edit_layers)
    lam = [strength if i in keep else 0.0 for i in range(len(inst.writers))]
    n_h = len(harmful_val)

    if refusal_ids:
        f0, g_bypass = _gradients(
            inst, R, harmful_val, lambda z, _k: refusal_score(z, refusal_ids).sum(),
            per_prompt=False, lam=lam, pad_id=pad_id, batch_size=batch_size, progress=progress,
        )  # fmt: skip
        bypass = (f0 - strength * g_bypass) / n_h
    else:  # nothing refused: no refusal score to move
        bypass = np.zeros(len(candidates))
        if progress:
            progress(n_h)

    def sampled_logprob(z, batch):
        # One next token per prompt drawn from the base model (the a = 0 point), seeded.
        lp = log_softmax(z)
        key = mx.random.key(seed * 100_003 + batch)
        y = mx.random.categorical(mx.stop_gradient(lp), key=key)
        return mx.take_along_axis(lp, y[:, None], axis=-1).sum()

    _, g_kl = _gradients(
        inst, R, harmless_val, sampled_logprob, per_prompt=True, lam=lam, pad_id=pad_id,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    kl = 0.5 * np.mean((strength * g_kl) ** 2, axis=0)
    return [
        Screened(l, p - n_pos, float(bypass[k]), float(kl[k]))
        for k, (l, p) in enumerate(candidates)
    ]
