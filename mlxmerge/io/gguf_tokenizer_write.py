"""A Hugging Face tokenizer folder as GGUF tokenizer metadata, as llama.cpp's converter writes it.

What ``convert_hf_to_gguf.py`` writes, read from ``tokenizer.json`` with the ``tokenizers``
library only (the converter loads transformers' ``AutoTokenizer``):

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): ``tokenizer.ggml.model = "gpt2"``, the tokens,
  their types (normal / control for special added tokens / user-defined), the merges, and
  ``tokenizer.ggml.pre``: llama.cpp picks its pre-tokenizer by the sha256 of the token ids of a
  fixed text (``get_vocab_base_pre``); the table of known hashes is ``data/gguf_pre_tokenizers.json``.
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma) and Unigram:
  ``tokenizer.ggml.model = "llama"`` with scores (from ``tokenizer.model`` when sentencepiece is
  installed, as the converter does; else the Unigram scores, or minus the merge rank for BPE).
- Special token ids, ``add_bos``/``add_eos`` and the chat template: gguf's own ``SpecialVocab``
  (what the converter calls), from tokenizer.json, tokenizer_config.json, chat_template.jinja and
  config.json.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from importlib import resources
from pathlib import Path

import gguf

from mlxmerge.errors import MlxmergeError
from mlxmerge.io.text import read_text

log = logging.getLogger(__name__)

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@functools.cache
def _pre_table() -> dict:
    return json.loads(resources.files("mlxmerge").joinpath("data/gguf_pre_tokenizers.json").read_text("utf-8"))  # fmt: skip


def pre_tokenizer_name(tokenizer_file: Path, tok_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer (``tokenizer.ggml.pre``).

    Unknown hashes: ``gpt-2`` for a plain GPT-2 ByteLevel pre-tokenizer (what llama.cpp's
    ``gpt-2`` implements), else ``default`` (llama.cpp refuses names it does not know).
    """
    from tokenizers import Tokenizer

    table = _pre_table()
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(table["text"]).ids
    name = table["pre"].get(hashlib.sha256(str(ids).encode()).hexdigest())
    if name is not None:
        return name
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    log.warning("%s: pre-tokenizer not known to llama.cpp; writing 'default'", tokenizer_file)
    return "default"


def _looks_special(token: str) -> bool:
    # llama.cpp's does_token_look_special: added tokens some models forget to mark special.
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _vocab_lists(tok_json: dict, vocab_size: int) -> tuple[list[str], list[float], list[int], str]:
    """(tokens, scores, token types, ggml model) for ids 0..vocab_size-1, padded as llama.cpp pads."""
    model = tok_json.get("model") or {}
    kind = model.get("type")
    spm = kind == "Unigram" or (kind == "BPE" and model.get("byte_fallback", False))
    if kind == "Unigram":
        pieces = {i: (p, float(s)) for i, (p, s) in enumerate(model.get("vocab", []))}
    elif kind in ("BPE", "WordPiece", "WordLevel"):
        # SentencePiece BPE scores are minus the merge order; an id's order is its rank.
        pieces = {i: (p, -float(i)) for p, i in model.get("vocab", {}).items()}
    else:
        raise MlxmergeError(f"tokenizer.json: model type {kind!r} cannot be written to GGUF")
    added = {t["id"]: t for t in tok_json.get("added_tokens", [])}
    size = max(vocab_size, max([*pieces, *added], default=-1) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-1000.0] * size
    types = [gguf.TokenType.UNUSED] * size
    unk = model.get("unk_id") if kind == "Unigram" else None
    for i, (piece, score) in pieces.items():
        tokens[i], scores[i] = piece, score
        if spm and (i == unk or piece == model.get("unk_token")):
            types[i] = gguf.TokenType.UNKNOWN
        elif spm and _BYTE_TOKEN.fullmatch(piece):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    for i, t in added.items():
        text = t["content"]
        if t.get("special") or _looks_special(text):
            types[i] = gguf.TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")  # llama.cpp pre-normalizes user-defined spaces
            types[i] = gguf.TokenType.USER_DEFINED
        tokens[i], scores[i] = text, -1000.0
    return tokens, scores, [int(t) for t in types], "llama" if spm else "gpt2"


def _sentencepiece_lists(model_file: Path, vocab_size: int):
    """The converter's ``_create_vocab_sentencepiece`` pieces, scores and types, or None."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        return None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_file))
    n = sp.vocab_size()
    size = max(vocab_size, n)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-10000.0] * size
    types = [int(gguf.TokenType.UNUSED)] * size
    for i in range(n):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        types[i] = int(kind)
    return tokens, scores, types


def read_tokenizer_json(folder: Path) -> dict:
    """``folder/tokenizer.json`` parsed; MlxmergeError naming the file when missing or broken."""
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise MlxmergeError(f"{folder}: no tokenizer.json; GGUF output needs the tokenizer")
    try:
        return json.loads(read_text(tok_file, "tokenizer"))
    except json.JSONDecodeError as e:
        raise MlxmergeError(f"{tok_file}: not valid JSON ({e.msg}, line {e.lineno})") from None


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> str:
    """Add the tokenizer in ``folder`` to ``writer``'s metadata; return the ggml tokenizer model.

    ``vocab_size`` is the embedding's row count: the token list is padded to it with
    ``[PAD{i}]`` (type unused) as llama.cpp pads. Raises MlxmergeError when ``folder`` has no
    ``tokenizer.json`` or its model type has no GGUF form.
    """
    tok_json = read_tokenizer_json(folder)
    tokens, scores, types, kind = _vocab_lists(tok_json, vocab_size)
    if kind == "llama" and (folder / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece_lists(folder / "tokenizer.model", vocab_size) or (
            tokens,
            scores,
            types,
        )
        # added tokens the .model lacks, as the converter takes them from tokenizer_config.json
        for t in tok_json.get("added_tokens", []):
            if t["id"] < len(tokens) and t.get("special"):
                tokens[t["id"]], types[t["id"]] = t["content"], int(gguf.TokenType.CONTROL)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer_name(folder / "tokenizer.json", tok_json))
    else:
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    cfg_file = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    if isinstance(tok_cfg.get("add_prefix_space"), bool):
        writer.add_add_space_prefix(tok_cfg["add_prefix_space"])
    special = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    return kind
