"""Batched forward passes and decoding on left-padded prompts, for any mlx-lm model.

Prompts are padded on the left so that the last prompt token sits at position -1 in every row.
mlx-lm's batch caches (``BatchKVCache``, ``BatchRotatingKVCache`` for sliding-window layers)
turn the per-row padding into the attention mask and per-row RoPE offsets, so a padded row
computes what it would compute alone. Models whose caches cannot batch (recurrent state, caches
that keep a prefix) run one prompt at a time, with a logged note.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn

from mlxmerge.errors import MlxmergeError
from mlxmerge.lm.blocks import Transparent, batch_ready
from mlxmerge.lm.load import model_type
from mlxmerge.lm.logprobs import ensemble_log_probs

log = logging.getLogger(__name__)

Progress = Callable[[int], None] | None


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[mx.array, list[int]]:
    """Left-pad to a (batch, length) int32 array; returns it with each row's padding."""
    n = max(len(s) for s in seqs)
    padding = [n - len(s) for s in seqs]
    rows = [[pad_id] * p + list(s) for p, s in zip(padding, seqs)]
    return mx.array(rows, dtype=mx.int32), padding


def _batch_cache(cache, left_padding: list[int]):
    from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache

    if type(cache) is KVCache:
        return BatchKVCache(left_padding)
    if type(cache) is RotatingKVCache and cache.keep == 0:
        return BatchRotatingKVCache(cache.max_size, left_padding)
    return None


def can_batch(model: nn.Module) -> bool:
    """Whether every layer's cache has a batched, left-padding-aware counterpart."""
    from mlx_lm.models.cache import make_prompt_cache

    return all(_batch_cache(c, [0]) is not None for c in make_prompt_cache(model))


def make_batch_cache(model: nn.Module, left_padding: list[int]) -> list:
    """A cache for a left-padded batch; the model's own cache for one unpadded prompt."""
    from mlx_lm.models.cache import make_prompt_cache

    caches = make_prompt_cache(model)
    if len(left_padding) == 1 and not left_padding[0]:
        return caches
    out = [_batch_cache(c, left_padding) for c in caches]
    if any(c is None for c in out):
        raise MlxmergeError(f"model_type {model_type(model)!r}: its cache cannot batch")
    return out


def batches(
    token_lists: Sequence[Sequence[int]], batch_size: int, model: nn.Module
) -> Iterator[list[int]]:
    """Indices of each batch, similar lengths together (less padding); batch 1 if the cache cannot batch."""
    if batch_size < 1:
        raise MlxmergeError(f"batch size must be at least 1 (got {batch_size})")
    if batch_size > 1 and not can_batch(model):
        log.info(
            "model_type %s: its cache cannot batch padded prompts; using batch size 1",
            model_type(model),
        )
        batch_size = 1
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def forward(model: nn.Module, tokens: mx.array, cache=None, *, last: bool = False) -> mx.array:
    """``model(tokens, cache=cache)`` with the batch fixes this architecture needs.

    ``last``: logits of the last position only, (batch, 1, vocab), where the final norm is found;
    else of every position. The head over a 49k vocabulary is 40% of a prompt's forward pass on
    a CPU (SmolLM2-135M), and only the last position's logits are used when decoding.
    """
    with batch_ready(model), last_position_head(model, last):
        return model(tokens, cache=cache)


# Names of the final norm in mlx-lm models (applied once, after the last block, before the head).
_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_norm")


class _LastPosition(Transparent):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __call__(self, x, *args, **kwargs):
        return self.inner(x[:, -1:, :], *args, **kwargs)


@contextmanager
def last_position_head(model: nn.Module, on: bool = True):
    """Within: the final norm (so the head) sees the last position only; unchanged when the
    model's final norm is not found."""
    inner = getattr(model, "model", None)
    name = None
    if on and isinstance(inner, nn.Module):
        name = next((n for n in _FINAL_NORMS if isinstance(inner.get(n), nn.Module)), None)
    if name is None:
        yield
        return
    norm = inner[name]
    inner[name] = _LastPosition(norm)
    try:
        yield
    finally:
        inner[name] = norm


def last_logits(
    model: nn.Module, token_lists: Sequence[Sequence[int]], *, pad_id: int = 0,
    batch_size: int = 16, progress: Progress = None,
) -> mx.array:  # fmt: skip
    """Raw next-token logits (float32) after each prompt, shape (n_prompts, vocab)."""

    def run(rows):
        tokens, padding = pad_left(rows, pad_id)
        return forward(model, tokens, make_batch_cache(model, padding), last=True)[:, -1, :]

    return _per_prompt(model, token_lists, batch_size, run, progress)


def _per_prompt(model, token_lists, batch_size: int, run, progress: Progress) -> mx.array:
    """``run(rows) -> (len(rows), vocab)`` over ``batches`` of the prompts, stacked back in the
    prompts' order as float32, one batch evaluated at a time."""
    out: list[mx.array | None] = [None] * len(token_lists)
    for idx in batches(token_lists, batch_size, model):
        z = run([token_lists[i] for i in idx]).astype(mx.float32)
        mx.eval(z)
        for j, i in enumerate(idx):
            out[i] = z[j]
        if progress:
            progress(len(idx))
    return mx.stack(out)


@dataclass
class Sample:
    tokens: list[int]
    """Generated tokens, without the stop token."""
    cost: int
    """Forward steps spent (tokens generated, the stop token included)."""
    logprob: float
    """Σ log p of the generated tokens (and the stop token) under the model, untempered."""


def _pick(lp: mx.array, temperature: float, top_p: float, key: mx.array) -> mx.array:
    if temperature <= 0:
        return mx.argmax(lp, axis=-1)
    logits = lp / temperature
    if top_p < 1.0:
        # Keep the smallest set of tokens whose probability reaches top_p.
        probs = mx.softmax(logits, axis=-1)
        order = mx.argsort(-probs, axis=-1)
        sorted_p = mx.take_along_axis(probs, order, axis=-1)
        before = mx.cumsum(sorted_p, axis=-1) - sorted_p
        drop_sorted = before >= top_p
        inverse = mx.argsort(order, axis=-1)
        drop = mx.take_along_axis(drop_sorted, inverse, axis=-1)
        logits = mx.where(drop, -mx.inf, logits)
    return mx.random.categorical(logits, axis=-1, key=key)


def sample(
    models: Sequence[nn.Module], token_lists: Sequence[Sequence[int]], *, eos_ids: set[int],
    n: int = 1, max_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
    pad_id: int = 0, batch_size: int = 16, progress: Progress = None,
) -> list[list[Sample]]:  # fmt: skip
    """``n`` continuations of every prompt (greedy when ``temperature`` is 0), batched, left-padded.

    Several ``models`` decode as an output-averaged ensemble (log p = log mean_m p_m).
    """
    rows = [(p, s) for p in range(len(token_lists)) for s in range(n)]
    flat = [token_lists[p] for p, _ in rows]
    out: list[list[Sample | None]] = [[None] * n for _ in token_lists]
    step_batch = batch_size if all(can_batch(m) for m in models) else 1
    for b, idx in enumerate(batches(flat, step_batch, models[0])):
        tokens, padding = pad_left([flat[i] for i in idx], pad_id)
        caches = [make_batch_cache(m, padding) for m in models]
        gen = [[] for _ in idx]
        score = [0.0] * len(idx)
        cost = [0] * len(idx)
        done = [False] * len(idx)
        keys = mx.random.split(mx.random.key(seed * 100_003 + b), max_tokens)
        y = tokens
        for step in range(max_tokens):
            lp = ensemble_log_probs(
                [forward(m, y, c, last=True)[:, -1, :] for m, c in zip(models, caches)]
            )  # fmt: skip
            t = _pick(lp, temperature, top_p, keys[step]).astype(mx.int32)
            chosen = mx.take_along_axis(lp, t[:, None], axis=-1)[:, 0]
            mx.eval(t, chosen)
            for j, (tok, l) in enumerate(zip(t.tolist(), chosen.tolist())):
                if done[j]:
                    continue
                cost[j] += 1
                score[j] += l
                if tok in eos_ids:
                    done[j] = True
                else:
                    gen[j].append(tok)
            if all(done):
                break
            y = t[:, None]
        for j, i in enumerate(idx):
            p, s = rows[i]
            out[p][s] = Sample(gen[j], cost[j], score[j])
        mx.clear_cache()
        if progress:
            progress(len(idx))
    return out


def generate_tokens(
    model: nn.Module, token_lists: Sequence[Sequence[int]], *, eos_ids: set[int],
    max_tokens: int = 100, pad_id: int = 0, batch_size: int = 16, progress: Progress = None,
) -> list[list[int]]:  # fmt: skip
    """Greedy continuations (without the stop token), each at most ``max_tokens`` long."""
    drawn = sample(
        [model], token_lists, eos_ids=eos_ids, max_tokens=max_tokens, pad_id=pad_id,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    return [row[0].tokens for row in drawn]


def generate(
    model: nn.Module, tokenizer, prompts: Sequence[str], *, max_tokens: int = 100,
    batch_size: int = 16, system: str | None = None, chat_template: str | None = None,
    progress: Progress = None,
) -> list[str]:  # fmt: skip
    """Greedy answers to chat prompts, decoded, in prompt order."""
    from mlxmerge.lm.chat import chat_tokens, eos_token_ids, pad_token_id

    token_lists = chat_tokens(tokenizer, prompts, system=system, chat_template=chat_template)
    ids = generate_tokens(
        model, token_lists, eos_ids=eos_token_ids(tokenizer), max_tokens=max_tokens,
        pad_id=pad_token_id(tokenizer), batch_size=batch_size, progress=progress,
    )  # fmt: skip
    return [tokenizer.decode(t) for t in ids]


def shared_prefix_length(token_lists: Sequence[Sequence[int]], keep: int = 1) -> int:
    """Length of the token prefix common to every list, leaving at least ``keep`` tokens of each.

    Chat templates start every prompt with the same tokens (a default system prompt: SmolLM2's
    is 20 of ~38 tokens, Qwen2.5's and Llama 3's are similar).
    """
    first = token_lists[0]
    n = min(len(t) for t in token_lists) - keep
    for t in token_lists[1:]:
        i = 0
        while i < n and t[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def can_share_prefix(model: nn.Module) -> bool:
    """Whether every layer's cache is a plain ``KVCache`` (a prefix cache can be tiled)."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return all(type(c) is KVCache for c in make_prompt_cache(model))


def prefix_caches(model: nn.Module, prefix: Sequence[int], n_rows: int) -> list:
    """Caches holding ``prefix`` computed once (one row), its keys and values tiled to ``n_rows``."""
    from mlx_lm.models.cache import make_prompt_cache

    caches = make_prompt_cache(model)
    forward(model, mx.array([list(prefix)], dtype=mx.int32), caches)
    for c in caches:
        k, v, offset = c.state
        k, v = k[..., :offset, :], v[..., :offset, :]
        if k.shape[0] == 1:  # (a wrapped layer may already have broadcast the prefix to n_rows)
            k, v = mx.repeat(k, n_rows, axis=0), mx.repeat(v, n_rows, axis=0)
        c.state = (k, v, offset)
    return caches


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[mx.array, mx.array]:
    """Right-pad to a (batch, length) int32 array; returns it with each row's last index."""
    n = max(len(s) for s in seqs)
    tokens = mx.array([list(s) + [pad_id] * (n - len(s)) for s in seqs], dtype=mx.int32)
    return tokens, mx.array([len(s) - 1 for s in seqs], dtype=mx.int32)


def forward_after_prefix(
    model: nn.Module, prefix: Sequence[int], rests: Sequence[Sequence[int]], *, pad_id: int = 0
) -> mx.array:
    """Logits (batch, vocab) after ``prefix + rest`` for each rest, the prefix computed once.

    The prefix runs as one row; its keys and values are tiled to the batch and the rests follow,
    padded on the *right*: with a causal mask no real token attends to a later pad, and every row
    keeps its RoPE positions, so row b computes what ``prefix + rests[b]`` computes alone.
    Needs ``can_share_prefix(model)``.
    """
    caches = prefix_caches(model, prefix, len(rests))
    tokens, last = pad_right(rests, pad_id)
    logits = forward(model, tokens, caches)
    return mx.take_along_axis(logits, last[:, None, None], axis=1)[:, 0, :]


def prompt_logits(
    model: nn.Module, token_lists: Sequence[Sequence[int]], *, pad_id: int = 0,
    batch_size: int = 16, min_prefix: int = 4, progress: Progress = None,
) -> mx.array:  # fmt: skip
    """``last_logits``, computing the prompts' shared prefix once per call when it is at least
    ``min_prefix`` tokens and the model's cache allows it (same numbers, less work)."""
    p = shared_prefix_length(token_lists)
    if p < min_prefix or not can_share_prefix(model):
        return last_logits(model, token_lists, pad_id=pad_id, batch_size=batch_size,
                           progress=progress)  # fmt: skip
    prefix = token_lists[0][:p]

    def run(rows):
        return forward_after_prefix(model, prefix, [r[p:] for r in rows], pad_id=pad_id)

    return _per_prompt(model, token_lists, batch_size, run, progress)
