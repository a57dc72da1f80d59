"""mergekit's YAML recipe schema: parse, validate, and resolve parameters per tensor."""

from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlxmerge.errors import MlxmergeError, RecipeError
from mlxmerge.io.chat_template import BUILTIN as BUILTIN_TEMPLATES
from mlxmerge.io.dtypes import parse_float_dtype
from mlxmerge.io.text import read_text, yaml_documents

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = (
    "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
    "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name",
)  # fmt: skip
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "parameters", "base_model", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")


@dataclass
class TokenSource:
    """Where one token's embedding row comes from (mergekit ``tokenizer.tokens.<tok>``).

    ``kind``: 'model' (the token's own row in ``model``), 'model_token' (row ``token_id`` or of
    ``token`` in ``model``), 'zero', or None (no source given).
    """

    kind: str | None = None
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass
class TokenizerSpec:
    """mergekit's ``tokenizer:`` block (``tokenizer_source: X`` is ``TokenizerSpec(source=X)``)."""

    source: str = "union"  # 'union' | 'base' | a model reference
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass
class Source:
    """One model's contiguous layers feeding one output slice (``layer_range`` is half-open)."""

    model: str
    layer_range: tuple[int, int] | None  # None: every layer (filled in once configs are read)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Slice:
    sources: list[Source]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    merge_method: str
    slices: list[Slice]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    from_models: bool = False  # written as ``models:`` (one slice over every layer)
    raw: dict = field(default_factory=dict)
    tokenizer: TokenizerSpec | None = None  # set when a vocabulary is built (source or block)
    name: str | None = None  # mergekit-multi: the name later documents refer to
    warnings: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        """Every referenced model, base first, each once."""
        refs = ([self.base_model] if self.base_model else []) + [
            s.model for sl in self.slices for s in sl.sources
        ]
        return list(dict.fromkeys(refs))


def _unknown(keys, accepted, where: str, warnings: list[str] | None = None) -> None:
    """Reject unknown keys; with ``warnings``, only record them (top level, as mergekit ignores them)."""
    for key in keys:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if warnings is not None:
                msg = f"{where}: unknown top-level key {key!r} ignored{hint}"
                warnings.append(msg)
                log.warning(msg)
                continue
            raise RecipeError(
                f"{where}: unknown key {key!r}{hint}; accepted: {', '.join(accepted)}"
            )


def _model_ref(value, where: str) -> str:
    if isinstance(value, dict) and "model" in value:  # mergekit's {model: {path: ...}} form
        value = value["model"]
    if isinstance(value, dict) and "path" in value:
        value = value["path"]
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where}: model must be a path or hub id, got {value!r}")
    return value


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _numbers(value):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; mergekit's validators read it as a number."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) if k in ("value",) else v for k, v in value.items()}
    return value


def _params(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: parameters must be a mapping, got {type(value).__name__}")
    return {k: _numbers(v) for k, v in value.items()}


def check_dtype(value, where: str):
    """``value`` unchanged if it names a float dtype mlxmerge writes; else a RecipeError at parse
    time naming the key (not later, from the planner, without saying which file or key)."""
    if value is not None:
        try:
            parse_float_dtype(value)
        except MlxmergeError as e:
            raise RecipeError(f"{where}: {e}") from None
    return value


def yaml_error(path: Path, e: yaml.YAMLError) -> RecipeError:
    """One line naming the file, the line and column, and what the parser expected there.

    PyYAML's own first line ("while parsing a flow node") says neither where nor what."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return RecipeError(f"{path}: not valid YAML{where}: {problem}")


def load_documents(source: str | Path) -> list[dict]:
    """The YAML documents of a recipe file (mergekit-multi files hold several, ``---``-separated)."""
    path = Path(source)
    text = read_text(path, "recipe", RecipeError)
    try:
        docs = yaml_documents(text, path, RecipeError)
    except yaml.YAMLError as e:
        raise yaml_error(path, e) from None
    if not docs:
        raise RecipeError(f"{path}: empty recipe")
    return docs


def read_document(source: str | Path | dict, what: str, several: str) -> tuple[object, str]:
    """``(document, where)``: the one YAML document of the file ``source`` and its path, or a dict
    as given with ``what`` as its name. ``several`` ends the error for a multi-document file."""
    if isinstance(source, dict):
        return source, what
    docs = load_documents(source)
    if len(docs) > 1:
        raise RecipeError(f"{source}: holds {len(docs)} YAML documents{several}")
    return docs[0], str(source)


def parse_recipe(source: str | Path | dict) -> Recipe:
    """Read a mergekit YAML recipe (path, YAML text or dict) into a ``Recipe``.

    A file with several YAML documents is a mergekit-multi recipe: read it with
    ``mlxmerge.merge.multi`` (``merge()`` and the CLI do).
    """
    raw, where = read_document(
        source, "recipe",
        several=" (a mergekit-multi recipe); run it with mlxmerge merge, which builds the named "
        "intermediate merges first",
    )  # fmt: skip
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{where}: a recipe is a YAML mapping with merge_method and models or slices"
        )
    warnings: list[str] = []
    _unknown(raw, TOP_LEVEL_KEYS, where, warnings)
    if "merge_method" not in raw:
        raise RecipeError(f"{where}: merge_method is missing")
    if "modules" in raw:
        raise RecipeError(
            f"{where}: 'modules' (multi-module models) is not supported yet; use models or slices"
        )
    if ("models" in raw) == ("slices" in raw):
        raise RecipeError(f"{where}: give exactly one of models or slices")
    base = _model_ref(raw["base_model"], f"{where}: base_model") if raw.get("base_model") else None
    if "models" in raw:
        if not isinstance(raw["models"], list) or not raw["models"]:
            raise RecipeError(f"{where}: models must be a non-empty list")
        sources = []
        for i, m in enumerate(raw["models"]):
            w = f"{where}: models[{i}]"
            if isinstance(m, str):
                m = {"model": m}
            if not isinstance(m, dict):
                raise RecipeError(f"{w}: expected a mapping with 'model'")
            _unknown(m, MODEL_KEYS, w)
            sources.append(
                Source(_model_ref(m.get("model"), w), None, _params(m.get("parameters"), w))
            )
        if base and base not in [s.model for s in sources]:
            sources.append(Source(base, None, {}))  # mergekit adds a missing base (#230)
        slices = [Slice(sources)]
    else:
        if not isinstance(raw["slices"], list) or not raw["slices"]:
            raise RecipeError(f"{where}: slices must be a non-empty list")
        slices = [_slice(s, f"{where}: slices[{i}]") for i, s in enumerate(raw["slices"])]
    tok = raw.get("tokenizer_source")
    if tok is not None and "tokenizer" in raw:
        raise RecipeError(f"{where}: give tokenizer_source or a tokenizer block, not both")
    if tok is not None:
        tok = _model_ref(tok, f"{where}: tokenizer_source")
        tokenizer = TokenizerSpec(source=tok)
    else:
        tokenizer = _tokenizer(raw.get("tokenizer"), f"{where}: tokenizer")
    return Recipe(
        merge_method=str(raw["merge_method"]),
        slices=slices,
        base_model=base,
        parameters=_params(raw.get("parameters"), f"{where}: parameters"),
        dtype=check_dtype(raw.get("dtype"), f"{where}: dtype"),
        out_dtype=check_dtype(raw.get("out_dtype"), f"{where}: out_dtype"),
        tokenizer_source=tok,
        chat_template=_chat_template(raw.get("chat_template"), f"{where}: chat_template"),
        from_models="models" in raw,
        raw=raw,
        tokenizer=tokenizer,
        name=str(raw["name"]) if raw.get("name") is not None else None,
        warnings=warnings,
    )


def _chat_template(value, where: str) -> str | None:
    """mergekit's rule: 'auto', a built-in name, or Jinja text (>= 20 characters with a '{')."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RecipeError(f"{where}: must be a template name or Jinja text, got {value!r}")
    if value == "auto" or value in BUILTIN_TEMPLATES:
        return value
    if len(value) < 20 or "{" not in value:
        raise RecipeError(
            f"{where}: {value!r} is neither a built-in template "
            f"({', '.join(BUILTIN_TEMPLATES)}, auto) nor Jinja text"
        )
    return value


def _tokenizer(raw, where: str) -> TokenizerSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: must be a mapping with source, tokens, pad_to_multiple_of")
    _unknown(raw, TOKENIZER_KEYS, where)
    source = _model_ref(raw.get("source", "union"), f"{where}.source")
    pad = raw.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise RecipeError(f"{where}.pad_to_multiple_of: must be a whole number >= 1, got {pad!r}")
    tokens = {}
    for tok, cfg in (raw.get("tokens") or {}).items():
        w = f"{where}.tokens[{tok!r}]"
        cfg = cfg or {}
        if not isinstance(cfg, dict):
            raise RecipeError(f"{w}: must be a mapping with source and force")
        _unknown(cfg, TOKEN_KEYS, w)
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{w}.force: must be true or false, got {force!r}")
        tokens[str(tok)] = _token_source(cfg.get("source"), force, w)
    return TokenizerSpec(source=source, tokens=tokens, pad_to_multiple_of=pad)


def _token_source(src, force: bool, where: str) -> TokenSource:
    if src is None:
        return TokenSource(force=force)
    if isinstance(src, str):
        return TokenSource("model", _model_ref(src, f"{where}.source"), force=force)
    if not isinstance(src, dict) or src.get("kind") not in ("model_token", "zero"):
        raise RecipeError(
            f"{where}.source: must be a model, {{kind: zero}} or "
            f"{{kind: model_token, model, token | token_id}}, got {src!r}"
        )
    if src["kind"] == "zero":
        _unknown(src, ("kind",), f"{where}.source")
        return TokenSource("zero", force=force)
    _unknown(src, ("kind", "model", "token", "token_id"), f"{where}.source")
    if ("token" in src) == ("token_id" in src):
        raise RecipeError(f"{where}.source: give exactly one of token and token_id")
    token_id = src.get("token_id")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)):
        raise RecipeError(f"{where}.source.token_id: must be a whole number, got {token_id!r}")
    return TokenSource(
        "model_token", _model_ref(src.get("model"), f"{where}.source"),
        None if token_id is not None else str(src["token"]), token_id, force,
    )  # fmt: skip


def _slice(raw, where: str) -> Slice:
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), list) or not raw["sources"]:
        raise RecipeError(f"{where}: a slice needs a non-empty 'sources' list")
    _unknown(raw, SLICE_KEYS, where)
    sources = []
    for j, s in enumerate(raw["sources"]):
        w = f"{where}.sources[{j}]"
        if not isinstance(s, dict):
            raise RecipeError(f"{w}: expected a mapping with model and layer_range")
        _unknown(s, SOURCE_KEYS, w)
        lr = s.get("layer_range")
        if lr is not None:
            ok = (
                isinstance(lr, (list, tuple))
                and len(lr) == 2
                and all(isinstance(x, int) for x in lr)
            )
            # An empty range [n, n] is mergekit's idiom for a last slice that only supplies
            # the final norm and lm_head.
            if not ok or lr[0] < 0 or lr[1] < lr[0]:
                raise RecipeError(
                    f"{w}: layer_range must be [start, end) with 0 <= start <= end, got {lr!r}"
                )
            lr = (lr[0], lr[1])
        sources.append(Source(_model_ref(s.get("model"), w), lr, _params(s.get("parameters"), w)))
    return Slice(sources, _params(raw.get("parameters"), where))


# -- parameter values: scalar | gradient list | [{filter, value}] ------------------------------


def evaluate_setting(value, tensor_name: str, t: float):
    """mergekit's ``evaluate_setting``: scalars pass, gradients interpolate at ``t``, filters match.

    Returns ``None`` when a filter list has no entry matching ``tensor_name``.
    """
    if isinstance(value, list):
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            scaled = t * (len(value) - 1)
            i0 = math.floor(scaled)
            i1 = min(len(value) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * value[i0] + frac * value[i1]
        if value and all(isinstance(v, (int, float, str)) for v in value):
            return value[int(t * (len(value) - 1))]
        for entry in value:
            if not isinstance(entry, dict) or "value" not in entry:
                raise RecipeError(
                    f"parameter entry {entry!r} must be a number or {{filter, value}}"
                )
            flt = entry.get("filter")
            if flt is None or flt == "*" or flt in tensor_name:
                return evaluate_setting(entry["value"], tensor_name, t)
        return None
    return value


def resolve_parameter(
    name: str, tensor_name: str, t: float, *, source: Source | None, slice_: Slice, recipe: Recipe
):
    """Precedence as mergekit: source > slice > top-level. ``None`` if unset everywhere."""
    layers = ([source.parameters] if source else []) + [slice_.parameters, recipe.parameters]
    for params in layers:
        if name in params:
            value = evaluate_setting(params[name], tensor_name, t)
            if value is not None:
                return value
    return None


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as YAML mergekit also reads (the verbatim source mapping)."""
    return yaml.safe_dump(recipe.raw, sort_keys=False)
