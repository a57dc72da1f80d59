"""A GGUF file's vocabulary as Hugging Face tokenizer files (``tokenizer.json`` and friends).

GGUF keeps the tokenizer as metadata under llama.cpp's keys (``tokenizer.ggml.*``). Two kinds
are rebuilt with the ``tokenizers`` library:

- ``gpt2``: byte-level BPE with the file's merges (SmolLM, Llama 3, Qwen 2/3). The split before
  BPE follows ``tokenizer.ggml.pre`` as llama.cpp's ``llama-vocab.cpp`` does (SmolLM/StarCoder
  isolate each digit, Llama 3 and Qwen 2 have their own regexes, anything else GPT-2's).
- ``llama``: SentencePiece BPE (Llama 2, Mistral, Gemma, Phi-3) with byte fallback; merges are
  the file's or, when it has none, recovered from the vocabulary ranked by score (by position
  for Gemma, whose scores do not follow its merge order), as transformers'
  ``integrations/gguf/gguf_tokenizer_mapping.py`` and ``generate_merges`` do.

Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
tokens; bos/eos/unk/pad and ``add_bos_token`` go to tokenizer_config.json; the chat template to
``chat_template.jinja``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre

from mlxmerge.errors import CheckpointError

CONTROL, USER_DEFINED, UNKNOWN = 3, 4, 2
SPACE = "\u2581"  # SentencePiece's visible space

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre → the split llama.cpp applies before byte-level BPE.
SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2_SPLIT),
}  # fmt: skip
# Pre-tokenizer names whose first split isolates every digit (llama.cpp: "\p{N}" then GPT-2's).
DIGITS_FIRST = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (openai/gpt-2 ``encoder.py``)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two
    vocabulary pieces, best-scored token first (transformers' ``generate_merges``)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]  # fmt: skip
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def build_tokenizer(fields: dict, arch: str | None = None) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` described by GGUF metadata ``fields``.

    Raises CheckpointError when the file has no vocabulary or one of a kind not handled here.
    """
    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise CheckpointError("the GGUF file holds no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tok = _byte_level(fields, tokens)
    elif kind == "llama":
        tok = _sentencepiece(fields, tokens, types, arch)
    else:
        raise CheckpointError(
            f"GGUF tokenizer model {kind!r} is not supported (gpt2 and llama are)"
        )
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == CONTROL]  # fmt: skip
    added = [AddedToken(t, special=False, normalized=False)
             for t, ty in zip(tokens, types) if ty == USER_DEFINED]  # fmt: skip
    tok.add_special_tokens(special)
    tok.add_tokens(added)
    bos = (
        _token(fields, tokens, "bos")
        if fields.get("tokenizer.ggml.add_bos_token", kind == "llama")
        else None
    )
    eos = _token(fields, tokens, "eos") if fields.get("tokenizer.ggml.add_eos_token") else None
    single = " ".join(x for x in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if x)
    pair = " ".join(x for x in (single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if x)
    specials = [(t, tokens.index(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )
    return tok


def _byte_level(fields: dict, tokens: list[str]) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    name = fields.get("tokenizer.ggml.pre", "default")
    if name in SPLITS:
        tok.pre_tokenizer = pre.Sequence([
            pre.Split(Regex(SPLITS[name]), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    elif name in DIGITS_FIRST:
        tok.pre_tokenizer = pre.Sequence([
            pre.Digits(individual_digits=True),
            pre.ByteLevel(add_prefix_space=False, use_regex=True),
        ])  # fmt: skip
    else:
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(
    fields: dict, tokens: list[str], types: list[int], arch: str | None
) -> Tokenizer:
    gemma = (arch or "").startswith("gemma")
    if gemma:  # Gemma stores tokens of several spaces as spaces; its vocabulary spells them ▁
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if fields.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    else:
        if gemma:
            ranks = {t: -i for i, t in enumerate(tokens)}
        else:
            scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            ranks = dict(zip(tokens, scores))
        merges = generate_merges(vocab, ranks)
    unk_id = fields.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, ty in enumerate(types) if ty == UNKNOWN), None)
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=True))  # fmt: skip
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:  # no dummy prefix; spaces become ▁ and split after each
        tok.normalizer = normalizers.Replace(" ", SPACE)
        tok.pre_tokenizer = pre.Split(" ", behavior="merged_with_previous")
    else:
        prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre.Metaspace(
            replacement=SPACE, prepend_scheme="first" if prefix else "never", split=False
        )
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _token(fields: dict, tokens: list[str], which: str) -> str | None:
    key = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
           "pad": "padding_token_id"}[which]  # fmt: skip
    i = fields.get(f"tokenizer.ggml.{key}")
    return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None


def write_tokenizer(fields: dict, folder: Path, config: dict) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json (and chat_template.jinja when the file has
    a template) into ``folder``; return the file names written."""
    arch = fields.get("general.architecture")
    tok = build_tokenizer(fields, arch if isinstance(arch, str) else None)
    tokens = fields["tokenizer.ggml.tokens"]
    kind = fields.get("tokenizer.ggml.model")
    tok.save(str(folder / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(config.get("max_position_embeddings") or 2**31 - 1),
    }
    for which in ("bos", "eos", "unk", "pad"):
        token = _token(fields, tokens, which)
        if token is not None:
            tok_config[f"{which}_token"] = token
    (folder / "tokenizer_config.json").write_text(
        json.dumps(tok_config, indent=2, ensure_ascii=False)
    )
    written = ["tokenizer.json", "tokenizer_config.json"]
    template = fields.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
        written.append("chat_template.jinja")
    return written
