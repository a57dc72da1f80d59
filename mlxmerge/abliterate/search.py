"""Heretic-style search over per-layer ablation weights, for two objectives: refusals and KL.

Idea from p-e-w/heretic (re-implemented, no code taken). A trial picks a direction index
``t ∈ [0.4, 0.9]·L`` (a float: the unit directions of the two neighbouring residual points are
interpolated and renormalized) and, separately for attention and MLP writers, a "tent" kernel::

    λ_i = w_max + (|i − p| / s) (w_min − w_max)   if |i − p| ≤ s,   else 0

with peak weight ``w_max``, peak position ``p``, minimum weight ``w_min`` and width ``s`` (the MLP
peak weight may go to 0, which switches MLP ablation off). Each trial is scored by the refusal
rate on harmful validation prompts (greedy answers, marker matching) and the first-token
KL(base ‖ ablated) on harmless ones, with the edit applied at inference time (no weight copies).
The sampler is seeded random search, then Gaussian steps around Pareto-optimal trials.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlxmerge.abliterate.directions import unit_np
from mlxmerge.abliterate.hooks import Instrumented
from mlxmerge.errors import MlxmergeError
from mlxmerge.eval.refusal import is_refusal
from mlxmerge.lm.chat import eos_token_ids
from mlxmerge.lm.generate import generate_tokens, last_logits
from mlxmerge.lm.logprobs import kl_divergence

# name: (low, high) as fractions of the layer count where marked "L".
SPACE = {
    "direction_index": (0.4, 0.9),  # × L
    "attn_max": (0.8, 1.5),
    "attn_pos": (0.0, 1.0),  # × (L - 1); heretic: 0.6-1.0, too late for shallow models
    "attn_min": (0.0, 1.0),  # × attn_max
    "attn_width": (0.0, 1.0),  # 1 + this × (L - 1); heretic: up to 0.6
    "mlp_max": (-0.25, 1.5),  # clamped at 0
    "mlp_pos": (0.0, 1.0),
    "mlp_min": (0.0, 1.0),
    "mlp_width": (0.0, 1.0),
}


def kernel(
    n_layers: int, peak: float, position: float, minimum: float, width: float
) -> list[float]:
    """Tent weights λ_i: ``peak`` at ``position``, falling linearly to ``minimum`` at ``width``, 0 beyond."""
    out = []
    for i in range(n_layers):
        d = abs(i - position)
        out.append(
            0.0 if d > width else peak + (d / width) * (minimum - peak) if width > 0 else peak
        )
    return out


def trial_weights(
    p: dict, n_layers: int, edit_layers: Sequence[int]
) -> tuple[list[float], list[float]]:
    keep = set(edit_layers)
    span = max(n_layers - 1, 1)
    out = []
    for c in ("attn", "mlp"):
        peak = max(p[f"{c}_max"], 0.0)
        w = kernel(
            n_layers, peak, p[f"{c}_pos"] * span, p[f"{c}_min"] * peak, 1 + p[f"{c}_width"] * span
        )
        out.append([x if i in keep else 0.0 for i, x in enumerate(w)])
    return out[0], out[1]


def interpolated_direction(diffs: np.ndarray, position: int, index: float) -> np.ndarray:
    """Unit direction at a fractional residual point (lerp of the two neighbours' unit vectors)."""
    lo = int(np.floor(index))
    hi = min(lo + 1, diffs.shape[0] - 1)
    a, b = unit_np(diffs[lo, position]), unit_np(diffs[hi, position])
    f = index - lo
    return unit_np((1 - f) * a + f * b).astype(np.float32)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (minimize both), sorted by the first objective."""
    front = []
    for i, (a, b) in enumerate(points):
        dominated = any(
            (c <= a and d <= b) and (c < a or d < b) for j, (c, d) in enumerate(points) if j != i
        )
        if not dominated and (a, b) not in [points[k] for k in front]:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _sample(rng: np.random.Generator, around: dict | None) -> dict:
    p = {}
    for k, (lo, hi) in SPACE.items():
        if around is None:
            p[k] = float(rng.uniform(lo, hi))
        else:
            p[k] = float(np.clip(around[k] + rng.normal(0, 0.1 * (hi - lo)), lo, hi))
    return p


def search(
    inst: Instrumented, tokenizer, diffs: np.ndarray, harmful_val: list[list[int]],
    harmless_val: list[list[int]], *, position: int = -1, trials: int = 20, seed: int = 0,
    pick: int | None = None, edit_layers: Sequence[int], pad_id: int = 0, batch_size: int = 16,
    max_tokens: int = 32, markers: Sequence[str], kl_threshold: float = 0.1,
    progress: Callable[[int], None] | None = None,
) -> dict:  # fmt: skip
    """Run ``trials`` trials; return the picked trial's weights and direction, and the report."""
    n_layers = len(inst.probes)
    n_points = diffs.shape[0]
    rng = np.random.default_rng(seed)
    base = last_logits(inst.model, harmless_val, pad_id=pad_id, batch_size=batch_size)
    eos = eos_token_ids(tokenizer)
    results = []
    n_startup = max(trials // 2, 1)
    for t in range(trials):
        if t < n_startup or not results:
            p = _sample(rng, None)
        else:
            front = pareto_front([(r["refusal_rate"], r["kl"]) for r in results])
            p = _sample(rng, results[front[int(rng.integers(len(front)))]]["params"])
        index = min(p["direction_index"] * n_layers, n_points - 1)
        r = interpolated_direction(diffs, position, index)
        attn, mlp = trial_weights(p, n_layers, edit_layers)
        inst.set_ablation(mx.array(r), attn, mlp)
        ids = generate_tokens(inst.model, harmful_val, eos_ids=eos, max_tokens=max_tokens,
                              pad_id=pad_id, batch_size=batch_size)  # fmt: skip
        rate = sum(is_refusal(tokenizer.decode(x), markers) for x in ids) / len(ids)
        kl = (
            kl_divergence(
                base, last_logits(inst.model, harmless_val, pad_id=pad_id, batch_size=batch_size)
            )
            .mean()
            .item()
        )
        inst.clear_ablation()
        results.append({"trial": t, "refusal_rate": rate, "kl": kl, "params": p,
                        "attn": attn, "mlp": mlp, "direction": r})  # fmt: skip
        if progress:
            progress(1)
    points = [(r["refusal_rate"], r["kl"]) for r in results]
    front = pareto_front(points)
    if pick is None:
        ok = [i for i, f in enumerate(front) if results[f]["kl"] <= kl_threshold]
        pick = ok[0] if ok else len(front) - 1
    elif not 0 <= pick < len(front):
        raise MlxmergeError(
            f"--pick {pick}: the Pareto front has {len(front)} trials (0-{len(front) - 1})"
        )
    chosen = results[front[pick]]
    public = [{k: v for k, v in r.items() if k != "direction"} for r in results]
    return {
        "attn": chosen["attn"], "mlp": chosen["mlp"], "directions": None,
        "global_direction": chosen["direction"],
        "report": {"trials": trials, "seed": seed, "picked": pick, "position": position,
                   "front": [public[i] for i in front], "all": public},
    }  # fmt: skip
