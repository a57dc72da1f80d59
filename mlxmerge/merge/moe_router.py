"""Router rows of a mixture of experts built from dense models (mergekit-moe's ``gate_mode``).

For each expert e and layer l the router row is a unit vector ``g[l, e]`` (shape ``(hidden,)``);
the router computes ``x @ g[l].T`` on the post-attention-normed residual, so a token is sent to the
experts whose prompts' states it resembles. Modes (mergekit 0.1.5, ``mergekit/moe/router.py``):

- ``hidden``: ``g[l, e] = normalize(mean_p h_l(p) − mean_n h_l(n))`` where ``h_l(p)`` is the
  residual stream *entering* layer l (the embeddings for l = 0) at the last token of prompt p,
  p over the expert's ``positive_prompts``, n over its ``negative_prompts`` (term omitted when
  there are none). Prompts are tokenized as ``bos_token + prompt`` without other special tokens.
- ``cheap_embed``: ``normalize(normalize(Σ_p Σ_t E[tok]) − normalize(Σ_n Σ_t E[tok]))`` over the
  token embeddings E of the same tokenization; the same row at every layer.
- ``random``: standard normal rows; ``uniform_random``: U(−1/√hidden, 1/√hidden) rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

log = logging.getLogger(__name__)

# "hidden_last" is mergekit's other name for "hidden".
GATE_MODES = ("hidden", "hidden_last", "cheap_embed", "random", "uniform_random")
_EPS = 1e-8  # mergekit's clamp on the norm


def prompt_tokens(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """mergekit's tokenization: the BOS token's text prepended, no other special tokens."""
    bos = getattr(tokenizer, "bos_token", None) or ""
    return [list(tokenizer.encode(bos + p, add_special_tokens=False)) for p in prompts]


def last_token_layer_inputs(
    model, token_lists: Sequence[Sequence[int]], batch_size: int = 32
) -> np.ndarray:
    """The residual stream entering every layer at each sequence's last token.

    Returns float32 ``(n_sequences, n_layers, hidden)``. Left-padded batches through mlx-lm's
    batch cache (padding masked, RoPE offsets per row), so each row equals its unpadded forward.
    The one place that captures activations for MoE routers: swap in the shared layer here.
    """
    from mlxmerge.lm.blocks import probes
    from mlxmerge.lm.generate import batches, make_batch_cache, pad_left

    rows: list[np.ndarray | None] = [None] * len(token_lists)
    with probes(model, verb="moe") as found:
        order = sorted(found)
        for i in order:
            found[i].slot.record = slice(-1, None)  # the last position: prompts are left-padded
        for idx in batches(token_lists, batch_size, model):
            # The pad id does not matter: padded positions are masked out.
            tokens, padding = pad_left([token_lists[i] for i in idx], 0)
            model(tokens, cache=make_batch_cache(model, padding))
            h = mx.stack([found[i].slot.inputs.pop()[:, -1, :] for i in order], axis=1)
            h = np.array(h.astype(mx.float32))  # (batch, n_layers, hidden)
            for j, i in enumerate(idx):
                rows[i] = h[j]
    return np.stack(rows)


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), _EPS)


def hidden_gates(
    states: np.ndarray, groups: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> np.ndarray:
    """Router rows from captured states ``(n_prompts, n_layers, hidden)``.

    ``groups[e]`` = (indices of expert e's positive prompts, of its negative prompts).
    Returns ``(n_layers, n_experts, hidden)`` float32.
    """
    rows = []
    for pos, neg in groups:
        v = states[list(pos)].astype(np.float64).mean(axis=0)
        if len(neg):
            v = v - states[list(neg)].astype(np.float64).mean(axis=0)
        rows.append(_normalize(v))
    return np.stack(rows, axis=1).astype(np.float32)


def cheap_embed_gates(
    embed: np.ndarray, groups: Sequence[tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]]],
    n_layers: int,
) -> np.ndarray:  # fmt: skip
    """Router rows from token embeddings ``embed`` (vocab, hidden); ``groups[e]`` holds token lists."""

    def summed(token_lists):
        ids = np.array([t for toks in token_lists for t in toks], dtype=np.int64)
        return _normalize(embed[ids].astype(np.float64).sum(axis=0))

    rows = []
    for pos, neg in groups:
        v = summed(pos)
        if len(neg):
            v = v - summed(neg)
        rows.append(_normalize(v))
    g = np.stack(rows).astype(np.float32)  # (n_experts, hidden)
    return np.broadcast_to(g, (n_layers, *g.shape)).copy()


def random_gates(
    mode: str, n_layers: int, n_experts: int, hidden: int, seed: int = 0
) -> np.ndarray:
    """``random``: N(0, 1) rows; ``uniform_random``: torch.nn.Linear's default init. Seeded."""
    rng = np.random.default_rng(seed)
    shape = (n_layers, n_experts, hidden)
    if mode == "random":
        return rng.standard_normal(shape).astype(np.float32)
    scale = math.sqrt(1.0 / hidden)
    return rng.uniform(-scale, scale, shape).astype(np.float32)


def warn_degenerate(gates: np.ndarray, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly linearly dependent (condition number > threshold)."""
    bad = [
        i for i in range(gates.shape[0]) if np.linalg.cond(gates[i].astype(np.float64)) > threshold
    ]
    if bad:
        log.warning(
            "layers %s have degenerate routing parameters: the experts' prompts may be too "
            "similar, and some experts will be underused",
            bad,
        )
    return bad
