"""Chat-templated prompt tokens and the tokenizer's pad / EOS / special ids."""

from __future__ import annotations

from collections.abc import Sequence

from mlxmerge.errors import MlxmergeError

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


def _messages(prompt: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]


def chat_tokens(
    tokenizer, prompts: Sequence[str], *, system: str | None = None,
    chat_template: str | None = None,
) -> list[list[int]]:  # fmt: skip
    """Token ids of each prompt as a user turn, with the assistant turn opened."""
    check_chat_template(tokenizer, chat_template)
    out = []
    for p in prompts:
        text = _render(tokenizer, _messages(p, system), chat_template)
        # The template already holds BOS and other special tokens.
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def post_instruction_tokens(
    tokenizer, *, system: str | None = None, chat_template: str | None = None
) -> list[int]:
    """The template tokens that follow the user's instruction (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``)."""
    check_chat_template(tokenizer, chat_template)
    text = _render(tokenizer, _messages(_MARK, system), chat_template)
    suffix = text.split(_MARK, 1)[1]
    return tokenizer.encode(suffix, add_special_tokens=False) if suffix else []


def pad_token_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def eos_token_ids(tokenizer) -> set[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids:
        return {int(i) for i in ids}
    eos = getattr(tokenizer, "eos_token_id", None)
    return {int(eos)} if eos is not None else set()


def special_ids(tokenizer) -> set[int]:
    """BOS, EOS, pad and every other special token id."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            ids.add(v)
    return ids
