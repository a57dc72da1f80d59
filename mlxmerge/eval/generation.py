"""Batched forward passes and greedy generation on chat-templated, left-padded prompts.

Prompts are padded on the left so that the last prompt token sits at position -1 in every
row. mlx-lm's ``BatchKVCache`` turns the per-row padding into the attention mask and into
per-row RoPE offsets, so a padded row computes exactly what it would compute alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
from mlx import nn

from mlxmerge.errors import MlxmergeError

log = logging.getLogger(__name__)

_MARK = "\u2063MLXMERGE_INSTRUCTION\u2063"


def _render(tokenizer, messages: list[dict], chat_template: str | None) -> str:
    kwargs = {"chat_template": chat_template} if chat_template else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )


def check_chat_template(tokenizer, chat_template: str | None = None) -> None:
    """Raise when neither the tokenizer nor the caller supplies a chat template."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise MlxmergeError(
            "the model's tokenizer has no chat template; pass one with --template "
            "(a Jinja file or string)"
        )


def chat_tokens(
    tokenizer, prompts: Sequence[str], *, system: str | None = None,
    chat_template: str | None = None,
) -> list[list[int]]:  # fmt: skip
    """Token ids of each prompt as a user turn, with the assistant turn opened."""
    check_chat_template(tokenizer, chat_template)
    out = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": p}
        ]
        text = _render(tokenizer, messages, chat_template)
        # The template already holds BOS and other special tokens.
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def post_instruction_tokens(
    tokenizer, *, system: str | None = None, chat_template: str | None = None
) -> list[int]:
    """The template tokens that follow the user's instruction (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``)."""
    check_chat_template(tokenizer, chat_template)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": _MARK}
    ]
    text = _render(tokenizer, messages, chat_template)
    suffix = text.split(_MARK, 1)[1]
    return tokenizer.encode(suffix, add_special_tokens=False) if suffix else []


def pad_token_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[mx.array, list[int]]:
    """Left-pad to a (batch, length) array; returns it with each row's padding."""
    n = max(len(s) for s in seqs)
    padding = [n - len(s) for s in seqs]
    rows = [[pad_id] * p + list(s) for p, s in zip(padding, seqs)]
    return mx.array(rows, dtype=mx.int32), padding


def make_batch_cache(model: nn.Module, left_padding: list[int]) -> list:
    """A KV cache for a left-padded batch; raises for models whose caches cannot batch."""
    from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

    caches = make_prompt_cache(model)
    if any(p for p in left_padding) or len(left_padding) > 1:
        if not all(type(c) is KVCache for c in caches):
            raise NotImplementedError("cache type cannot batch")
        return [BatchKVCache(left_padding) for _ in caches]
    return caches


def can_batch(model: nn.Module) -> bool:
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return all(type(c) is KVCache for c in make_prompt_cache(model))


def batches(
    token_lists: Sequence[Sequence[int]], batch_size: int, model: nn.Module
) -> Iterator[list[int]]:
    """Indices of each batch, similar lengths together (less padding); batch 1 if the cache cannot batch."""
    if batch_size < 1:
        raise MlxmergeError(f"batch size must be at least 1 (got {batch_size})")
    if batch_size > 1 and not can_batch(model):
        log.info("this model's cache cannot batch padded prompts; using batch size 1")
        batch_size = 1
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def last_logits(
    model: nn.Module, token_lists: Sequence[Sequence[int]], *, pad_id: int = 0,
    batch_size: int = 16, progress: Callable[[int], None] | None = None,
) -> mx.array:  # fmt: skip
    """Raw next-token logits (float32) after each prompt, shape (n_prompts, vocab)."""
    out: list[mx.array | None] = [None] * len(token_lists)
    for idx in batches(token_lists, batch_size, model):
        tokens, padding = pad_left([token_lists[i] for i in idx], pad_id)
        logits = model(tokens, cache=make_batch_cache(model, padding))[:, -1, :].astype(mx.float32)
        mx.eval(logits)
        for j, i in enumerate(idx):
            out[i] = logits[j]
        if progress:
            progress(len(idx))
    return mx.stack(out)


def generate_tokens(
    model: nn.Module, token_lists: Sequence[Sequence[int]], *, eos_ids: set[int],
    max_tokens: int = 100, pad_id: int = 0, batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:  # fmt: skip
    """Greedy continuations (without the stop token), each at most ``max_tokens`` long."""
    out: list[list[int]] = [[] for _ in token_lists]
    for idx in batches(token_lists, batch_size, model):
        tokens, padding = pad_left([token_lists[i] for i in idx], pad_id)
        cache = make_batch_cache(model, padding)
        done = [False] * len(idx)
        y = tokens
        for _ in range(max_tokens):
            logits = model(y, cache=cache)[:, -1, :]
            y = mx.argmax(logits, axis=-1).astype(mx.int32)
            mx.eval(y)
            for j, t in enumerate(y.tolist()):
                if done[j]:
                    continue
                if t in eos_ids:
                    done[j] = True
                else:
                    out[idx[j]].append(t)
            if all(done):
                break
            y = y[:, None]
        mx.clear_cache()
        if progress:
            progress(len(idx))
    return out


def eos_token_ids(tokenizer) -> set[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids:
        return {int(i) for i in ids}
    eos = getattr(tokenizer, "eos_token_id", None)
    return {int(eos)} if eos is not None else set()


def generate(
    model: nn.Module, tokenizer, prompts: Sequence[str], *, max_tokens: int = 100,
    batch_size: int = 16, system: str | None = None, chat_template: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[str]:  # fmt: skip
    """Greedy answers to chat prompts, decoded, in prompt order."""
    token_lists = chat_tokens(tokenizer, prompts, system=system, chat_template=chat_template)
    ids = generate_tokens(
        model, token_lists, eos_ids=eos_token_ids(tokenizer), max_tokens=max_tokens,
        pad_id=pad_token_id(tokenizer), batch_size=batch_size, progress=progress,
    )  # fmt: skip
    return [tokenizer.decode(t) for t in ids]
