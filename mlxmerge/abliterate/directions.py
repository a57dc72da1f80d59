"""Refusal directions: difference of means of the residual stream, chosen by measurement.

Residual points are indexed 0..L: point l < L is the input of layer l, point L the output of
the last layer. ``diff[l, p] = mean_harmful − mean_harmless`` at point l and post-instruction
position p (Arditi et al. 2024, arXiv 2406.11717, §2.1-2.3). The "projected" variant removes the
component along the harmless mean (heretic's ``orthogonalize_direction``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from mlxmerge.abliterate.hooks import Instrumented
from mlxmerge.errors import MlxmergeError
from mlxmerge.lm.generate import (
    batches,
    can_share_prefix,
    forward,
    last_logits,
    make_batch_cache,
    pad_left,
    pad_right,
    prefix_caches,
    prompt_logits,
    shared_prefix_length,
)
from mlxmerge.lm.logprobs import kl_divergence, log_softmax

log = logging.getLogger(__name__)


def mean_residuals(
    inst: Instrumented, token_lists: Sequence[Sequence[int]], n_positions: int, *,
    pad_id: int = 0, batch_size: int = 16, last_point: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:  # fmt: skip
    """Mean residual stream at the last ``n_positions`` positions, (L+1, P, d) in float64.

    With ``last_point`` only points 0..last_point are returned ((last_point+1, P, d)), and MLX
    never computes the layers above it (nothing reads them).
    """
    n_layers = len(inst.probes)
    n_points = n_layers + 1 if last_point is None else last_point + 1
    # The shared prefix (chat template, default system prompt) once per batch, when possible.
    p = shared_prefix_length(token_lists, keep=n_positions)
    shared = p >= 4 and can_share_prefix(inst.model)
    total = None
    for idx in batches(token_lists, batch_size, inst.model):
        for probe in inst.probes:
            probe.slot.record, probe.slot.inputs, probe.slot.outputs = None, [], []
        if shared:
            caches = prefix_caches(inst.model, token_lists[idx[0]][:p], len(idx))
            tokens, last = pad_right([token_lists[i][p:] for i in idx], pad_id)
            # (B, P) positions of each row's last n_positions tokens (rows are right-padded)
            at = last[:, None] - n_positions + 1 + mx.arange(n_positions)[None, :]
            pick = lambda x, at=at: mx.take_along_axis(x, at[..., None], axis=1)
            record = slice(None)
        else:
            tokens, padding = pad_left([token_lists[i] for i in idx], pad_id)
            caches = make_batch_cache(inst.model, padding)
            pick, record = (lambda x: x), slice(-n_positions, None)
        for probe in inst.probes:
            probe.slot.record = record
        forward(inst.model, tokens, caches)
        points = [pick(inst.probes[i].slot.inputs[0]) for i in range(min(n_points, n_layers))]
        if n_points > n_layers:
            points.append(pick(inst.probes[-1].slot.outputs[0]))
        acts = mx.stack(points).astype(mx.float32)  # (L+1, B, P, d)
        mx.eval(acts)
        s = np.asarray(acts, dtype=np.float64).sum(axis=1)
        total = s if total is None else total + s
        if progress:
            progress(len(idx))
    for probe in inst.probes:
        probe.slot.record, probe.slot.inputs, probe.slot.outputs = None, [], []
    return total / len(token_lists)


def difference_of_means(
    harmful_mean: np.ndarray, harmless_mean: np.ndarray, *, projected: bool = True
) -> np.ndarray:
    """Candidate directions (L+1, P, d), unnormalized; ``projected`` removes the harmless-mean part."""
    diff = harmful_mean - harmless_mean
    if projected:
        g = harmless_mean / np.maximum(np.linalg.norm(harmless_mean, axis=-1, keepdims=True), 1e-12)
        diff = diff - np.sum(diff * g, axis=-1, keepdims=True) * g
    return diff


def check_direction(v: np.ndarray, what: str = "the refusal direction") -> None:
    """Refuse a direction holding NaN/Inf: orthogonalizing against it would ruin every weight."""
    bad = ~np.isfinite(np.asarray(v))
    if bad.any():
        raise MlxmergeError(
            f"{what} holds {int(bad.sum())} non-finite entries (NaN/Inf); the activations it "
            "came from overflowed or the model's weights are non-finite (mlxmerge inspect --check)"
        )


def unit_np(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def refusal_score(logits: mx.array, refusal_ids: Sequence[int], eps: float = 1e-8) -> mx.array:
    """Per-prompt log-odds of starting with a refusal token: log p_R − log(1 − p_R)."""
    if not refusal_ids:  # a forced edit on a model that refuses nothing: no refusal to score
        return mx.zeros((logits.shape[0],))
    p = mx.exp(log_softmax(logits))
    p_r = mx.sum(p[:, mx.array(list(refusal_ids))], axis=-1)
    return mx.log(p_r + eps) - mx.log(1 - p_r + eps)


@dataclass
class Candidate:
    layer: int  # residual point the direction comes from
    position: int  # negative index into the prompt
    bypass: float  # mean refusal log-odds on harmful prompts with the direction ablated
    kl: float  # mean first-token KL(base ‖ ablated) on harmless prompts
    induce: float  # mean refusal log-odds on harmless prompts with the raw difference added
    reason: str = ""  # why it was filtered out ("" = kept)


@dataclass
class Selection:
    candidates: list[Candidate]
    chosen: Candidate
    why: str
    separation: list[float] = field(default_factory=list)  # per point, at the chosen position


def candidate_points(
    diffs: np.ndarray, layers: Sequence[int], positions: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """(layer, position index) pairs to measure; points whose difference is ~0 are left out
    (template tokens at the embedding point are identical for both prompt sets)."""
    n_pos = diffs.shape[1]
    scale = max(float(np.linalg.norm(diffs)), 1e-30)
    pos = range(n_pos) if positions is None else [p % n_pos for p in positions]
    return [(l, p) for l in layers for p in pos if np.linalg.norm(diffs[l, p]) >= 1e-6 * scale]


@contextmanager
def last_position_head(inst: Instrumented):
    """Run the final norm and LM head on the last position only (the rest is never read):
    ~20% of a small model's forward pass is the head (SmolLM2-135M: 28M of 134M MACs a token)."""
    probe = inst.probes[-1]
    probe.slot.edit = lambda h: h[:, -1:, :]
    try:
        yield
    finally:
        probe.slot.edit = None


def score_candidates(
    inst: Instrumented, diffs: np.ndarray, harmful_val: list[list[int]], harmless_val: list[list[int]],
    refusal_ids: Sequence[int], *, edit_layers: Sequence[int], strength: float = 1.0,
    candidates: Sequence[tuple[int, int]], pad_id: int = 0, batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[Candidate]:  # fmt: skip
    """Measure bypass, KL and induce for every (layer, position index) in ``candidates``.

    Three forward passes over the validation prompts per candidate (Arditi et al. 2024, §2.3).
    """
    n_layers = len(inst.probes)
    n_pos = diffs.shape[1]
    lam = [strength if i in set(edit_layers) else 0.0 for i in range(n_layers)]

    def logits(prompts):
        if shared_prefix_length(prompts) >= 4 and can_share_prefix(inst.model):
            return prompt_logits(inst.model, prompts, pad_id=pad_id, batch_size=batch_size)
        with last_position_head(inst):
            return last_logits(inst.model, prompts, pad_id=pad_id, batch_size=batch_size)

    out = []
    base_harmless = logits(harmless_val)
    for layer, p in candidates:
        r = mx.array(unit_np(diffs[layer, p]).astype(np.float32))
        inst.set_ablation(r, lam, lam)
        bypass = refusal_score(logits(harmful_val), refusal_ids).mean()
        kl = kl_divergence(base_harmless, logits(harmless_val)).mean()
        inst.clear_ablation()
        induce = mx.array(float("nan"))
        if layer < n_layers:
            inst.probes[layer].slot.add = mx.array(diffs[layer, p].astype(np.float32))
            induce = refusal_score(logits(harmless_val), refusal_ids).mean()
            inst.probes[layer].slot.add = None
        out.append(Candidate(layer, p - n_pos, bypass.item(), kl.item(), induce.item()))
        if progress:
            progress(1)
    return out


def select_candidate(
    candidates: list[Candidate], n_layers: int, *, kl_threshold: float = 0.1,
    induce_threshold: float = 0.0, prune_fraction: float = 0.2,
) -> tuple[Candidate, str]:  # fmt: skip
    """Arditi's filters (NaN, last 20% of layers, KL, induce), then the lowest bypass score."""
    limit = int((1 - prune_fraction) * n_layers)
    for c in candidates:
        if any(np.isnan(v) for v in (c.bypass, c.kl, c.induce)):
            c.reason = "no difference" if np.isnan(c.bypass) else "nan"
        elif c.layer >= limit:
            c.reason = f"layer >= {limit} (last {prune_fraction:.0%})"
        elif c.kl > kl_threshold:
            c.reason = f"kl > {kl_threshold}"
        elif c.induce < induce_threshold:
            c.reason = f"induce < {induce_threshold}"
    kept = [c for c in candidates if not c.reason]
    if kept:
        best = min(kept, key=lambda c: (c.bypass, c.kl))
        why = (
            f"lowest refusal score after ablation ({best.bypass:.2f}) among {len(kept)} of "
            f"{len(candidates)} candidates passing the filters (layer < {limit}, "
            f"KL <= {kl_threshold}, induce >= {induce_threshold}); KL {best.kl:.4f}, induce {best.induce:.2f}"
        )
        return best, why
    # Nothing passes: relax to the layer filter only and say so (Arditi's code stops here).
    pool = [
        c for c in candidates if not np.isnan(c.bypass) and not c.reason.startswith("layer")
    ] or [c for c in candidates if not np.isnan(c.bypass)]
    if not pool:  # every refusal score NaN: the harmful and harmless means did not differ
        raise MlxmergeError(
            f"none of the {len(candidates)} candidate directions changes the refusal score (the "
            "harmful and harmless prompts give the same activations); check --harmful/--harmless"
        )
    # Equal refusal scores (e.g. all 0 when nothing was refused) break on KL: of two edits that
    # remove as much refusal, the one that changes harmless answers least.
    best = min(pool, key=lambda c: (c.kl > kl_threshold, c.bypass, c.kl))
    ties = sum(c.bypass == best.bypass for c in pool)
    why = (
        f"no candidate passed every filter; took the lowest refusal score ({best.bypass:.2f}) "
        f"preferring KL <= {kl_threshold}"
        + (f", the lowest KL of {ties} with that score" if ties > 1 else "")
        + f" (KL {best.kl:.4f}, induce {best.induce:.2f})"
    )
    log.warning(why)
    return best, why


def separation(harmful_mean: np.ndarray, harmless_mean: np.ndarray, position: int) -> list[float]:
    """Per residual point: ‖mean difference‖ / mean ‖activation‖ at one position (plot data)."""
    d = np.linalg.norm(harmful_mean[:, position] - harmless_mean[:, position], axis=-1)
    scale = 0.5 * (
        np.linalg.norm(harmful_mean[:, position], axis=-1)
        + np.linalg.norm(harmless_mean[:, position], axis=-1)
    )
    return (d / np.maximum(scale, 1e-12)).tolist()
