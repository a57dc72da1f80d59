"""Output vocabulary for ``tokenizer_source`` / ``tokenizer:``: build it, re-index embedding rows to it.

Follows mergekit 0.1.5 (``mergekit/tokenizer/build.py`` and ``embed.py``, rewritten in PR #334):
the output tokenizer is the base's (``base``), a model's (a reference) or the base's plus every token
another model adds (``union``), plus the tokens the ``tokens:`` block names. Each model's embedding
and lm_head rows are then permuted to that vocabulary *before* the merge method runs. A token a model
lacks takes, in order: the ``tokens:`` entry's source; the row of the only model that has it; the base
model's row; the mean of the rows of the models that have it; zeros (no model has it). Rows added by
``pad_to_multiple_of`` take each model's mean row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmerge.errors import RecipeError
from mlxmerge.io import Checkpoint, open_checkpoint
from mlxmerge.merge.recipe import TokenizerSpec, TokenSource

log = logging.getLogger(__name__)


@dataclass
class Vocabulary:
    """The output tokenizer and, per model, where each output token's row comes from."""

    tokenizer: object  # transformers tokenizer, saved into the output folder
    tokens: dict[str, int]  # output vocabulary: token -> id
    size: int  # rows written: len(tokens), rounded up to pad_to_multiple_of
    permutations: dict[str, np.ndarray]  # model -> (len(tokens),) old row per output id, -1 if none
    original_vocabs: dict[str, dict[str, int]]
    spec: TokenizerSpec
    base: str  # the model whose tokenizer the output starts from
    base_model: str | None = None  # the recipe's base_model: its row fills tokens others lack

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))


def _auto_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:  # noqa: BLE001 (transformers raises many kinds; one line for the user)
        raise RecipeError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {e})") from None


def _vocab_size(ckpt: Checkpoint, fallback: int) -> int:
    n = ckpt.config_value("vocab_size")
    return int(n) if n else fallback


def _stripped(tokenizer, vocab_size: int, path: Path):
    """mergekit's get_stripped_tokenizer: drop tokens with ids >= the model's vocab_size."""
    unused = [t for t, i in tokenizer.get_vocab().items() if i >= vocab_size]
    if not unused:
        return tokenizer
    import tokenizers

    tok = json.loads(tokenizer._tokenizer.to_str())
    if tok["model"]["type"] != "BPE":
        raise RecipeError(
            f"{path}: tokenizer has ids beyond vocab_size {vocab_size} and is not BPE; "
            "mergekit's vocabulary merge cannot strip it"
        )
    unused_set = set(unused)
    tok["added_tokens"] = [e for e in tok["added_tokens"] if e["id"] < vocab_size]
    for t in unused:
        tok["model"]["vocab"].pop(t, None)

    def keep(m):
        parts = m.split(" ") if isinstance(m, str) else m
        return not any(p in unused_set for p in parts)

    tok["model"]["merges"] = [m for m in tok["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(tok))
    return tokenizer


def _union(base_tok, toks: dict[str, object], sizes: dict[str, int]):
    """mergekit's build_union_tokenizer: the base tokenizer plus every other model's tokens."""
    import tempfile

    from transformers import AutoTokenizer

    out_vocab: dict[str, int] = {}
    out_added: dict[str, object] = {}
    for model, tok in toks.items():
        added = tok.added_tokens_decoder
        added_text = {info.content for info in added.values()}
        for t, i in tok.get_vocab().items():
            if i < sizes[model] and t not in added_text and t not in out_vocab:
                out_vocab[t] = len(out_vocab)
        for i, info in added.items():
            if i < sizes[model] and info.content not in out_added:
                out_added[info.content] = info  # the first settings win, as in mergekit
    with tempfile.TemporaryDirectory() as d:  # a copy: never mutate the base's tokenizer
        base_tok.save_pretrained(d)
        res = AutoTokenizer.from_pretrained(d, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


def build_vocabulary(
    spec: TokenizerSpec, base: str | None, models: list[str], ckpts: list[Checkpoint]
) -> Vocabulary:
    """Build the output tokenizer and every model's row permutation (headers and tokenizers only).

    ``models`` / ``ckpts``: every model of the recipe, base first. Without a base model the first
    listed model plays the base (mergekit picks an arbitrary one: its model set is unordered).
    """
    by_ref = dict(zip(models, ckpts))
    base_model, base = base, base or models[0]
    sizes = {}
    toks = {}
    for m in models:
        tok = _auto_tokenizer(by_ref[m].path)
        sizes[m] = _vocab_size(by_ref[m], len(tok.get_vocab()))
        toks[m] = _stripped(tok, sizes[m], by_ref[m].path) if m == base else tok
    toks = {base: toks[base], **{m: t for m, t in toks.items() if m != base}}
    if spec.source == "base":
        out = toks[base]
    elif spec.source == "union":
        out = _union(toks[base], toks, sizes)
    else:
        path = by_ref[spec.source].path if spec.source in by_ref else None
        out = _auto_tokenizer(path or open_checkpoint(spec.source).path)
    existing = set(out.get_vocab())
    for t in spec.tokens:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    tokens = out.get_vocab()
    perms = {}
    for m in models:
        mv = toks[m].get_vocab()
        p = np.full(len(tokens), -1, dtype=np.int64)
        for t, new in tokens.items():
            old = mv.get(t, -1)
            if 0 <= old < sizes[m]:
                p[new] = old
        perms[m] = p
    original = {m: dict(toks[m].get_vocab()) for m in models}
    _check_token_sources(spec, tokens, perms, models, original)
    size = len(tokens)
    pad = spec.pad_to_multiple_of
    if pad and size % pad:
        size += pad - size % pad
    return Vocabulary(out, tokens, size, perms, original, spec, base, base_model)


def _check_token_sources(spec, tokens, perms, models, original) -> None:
    # before any tensor is computed: every source the tokens: block names must exist
    for t, src in spec.tokens.items():
        where = f"tokenizer.tokens[{t!r}]"
        if src.kind in ("model", "model_token") and src.model not in models:
            raise RecipeError(f"{where}: model {src.model} is not one of the recipe's models")
        if (
            src.kind == "model_token"
            and src.token is not None
            and src.token not in original[src.model]
        ):
            raise RecipeError(f"{where}: token {src.token!r} is not in {src.model}'s tokenizer")
        missing = any(perms[m][tokens[t]] < 0 for m in models)
        if src.kind is None and (src.force or missing):
            raise RecipeError(f"{where}: give a source (a model, kind: zero or kind: model_token)")


def permute_rows(vocab: Vocabulary, arrays: dict[str, mx.array]) -> dict[str, mx.array]:
    """Re-index each model's (rows, ...) embedding to ``(vocab.size, ...)`` (mergekit's PermutedVocabulary).

    ``arrays``: model reference -> its float32 embedding or lm_head, for the models of one tensor.
    """
    models = list(arrays)
    n = len(vocab.tokens)
    perm = {m: vocab.permutations[m] for m in models}
    cfgs: dict[str, TokenSource] = dict(vocab.spec.tokens)
    average = set()
    for t, i in vocab.tokens.items():  # mergekit's assign_embedding_sources
        if t in cfgs:
            continue
        has = [perm[m][i] >= 0 for m in models]
        if sum(has) == 1:
            cfgs[t] = TokenSource("model", models[has.index(True)])
        elif sum(has) == 0:
            cfgs[t] = TokenSource("zero")
            log.warning("token %r is in no model: its row is zero", t)
        elif vocab.base_model in models and perm[vocab.base_model][i] >= 0:
            cfgs[t] = TokenSource("model", vocab.base_model)
        else:
            average.add(t)
    defaults: dict[int, mx.array] = {}
    for t, i in vocab.tokens.items():
        cfg = cfgs.get(t)
        forced = bool(cfg and cfg.force)
        if not forced and all(perm[m][i] >= 0 for m in models):
            continue
        if t in average:
            rows = [arrays[m][int(perm[m][i])] for m in models if perm[m][i] >= 0]
            defaults[i] = sum(rows[1:], rows[0]) / len(rows)
        elif cfg is not None:
            defaults[i] = _default_row(vocab, arrays, perm, t, i, cfg)
    forced_ids = [i for t, i in vocab.tokens.items() if t in cfgs and cfgs[t].force]
    out = {}
    for m in models:
        p = perm[m]
        own = p >= 0
        own[forced_ids] = False
        x = arrays[m]
        rows = mx.take(x, mx.array(np.where(own, p, 0).astype(np.int32)), axis=0)
        rows = mx.where(mx.array(own)[:, None], rows, 0.0)
        fill = [i for i in range(n) if not own[i] and i in defaults]
        if fill:
            idx = mx.array(np.array(fill, dtype=np.int32))
            rows[idx] = mx.stack([defaults[i] for i in fill])
        if vocab.size > n:  # padding rows: the mean embedding (Hewitt, vocab expansion)
            mean = rows.mean(axis=0, keepdims=True)
            rows = mx.concatenate([rows, mx.repeat(mean, vocab.size - n, axis=0)], axis=0)
        out[m] = rows
    return out


def _default_row(vocab, arrays, perm, token, i, cfg: TokenSource) -> mx.array:
    where = f"tokenizer.tokens[{token!r}]"
    if cfg.kind == "zero":
        return mx.zeros(next(iter(arrays.values())).shape[1:])
    if cfg.model not in arrays:
        raise RecipeError(f"{where}: takes a row from {cfg.model}, which this tensor does not read")
    x = arrays[cfg.model]
    if cfg.kind == "model_token":
        row = cfg.token_id
        if row is None:
            row = vocab.original_vocabs[cfg.model].get(cfg.token)
            if row is None:
                raise RecipeError(f"{where}: token {cfg.token!r} is not in {cfg.model}")
        if not 0 <= row < x.shape[0]:
            raise RecipeError(f"{where}: token id {row} is out of range for {cfg.model}")
        return x[row]
    if perm[cfg.model][i] < 0:
        raise RecipeError(f"{where}: token {token!r} is not in {cfg.model}")
    return x[int(perm[cfg.model][i])]
