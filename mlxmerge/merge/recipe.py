"""mergekit's YAML recipe schema: parse, validate, and resolve parameters per tensor."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlxmerge.errors import RecipeError

TOP_LEVEL_KEYS = (
    "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
    "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name",
)  # fmt: skip
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "parameters", "base_model", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")


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

    @property
    def models(self) -> list[str]:
        """Every referenced model, base first, each once."""
        refs = ([self.base_model] if self.base_model else []) + [
            s.model for sl in self.slices for s in sl.sources
        ]
        return list(dict.fromkeys(refs))


def _unknown(keys, accepted, where: str) -> None:
    for key in keys:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
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


def _params(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: parameters must be a mapping, got {type(value).__name__}")
    return dict(value)


def parse_recipe(source: str | Path | dict) -> Recipe:
    """Read a mergekit YAML recipe (path, YAML text or dict) into a ``Recipe``."""
    where = "recipe"
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        where = str(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise RecipeError(f"{path}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{where}: a recipe is a YAML mapping with merge_method and models or slices"
        )
    _unknown(raw, TOP_LEVEL_KEYS, where)
    if "merge_method" not in raw:
        raise RecipeError(f"{where}: merge_method is missing")
    if "modules" in raw:
        raise RecipeError(
            f"{where}: 'modules' (multi-module models) is not supported yet; use models or slices"
        )
    if "tokenizer" in raw:
        raise RecipeError(
            f"{where}: the 'tokenizer' block (vocabulary union) is not supported yet; use tokenizer_source: base or a model"
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
    if tok == "union":
        raise RecipeError(
            f"{where}: tokenizer_source: union is not supported yet; use base or a model reference"
        )
    return Recipe(
        merge_method=str(raw["merge_method"]),
        slices=slices,
        base_model=base,
        parameters=_params(raw.get("parameters"), f"{where}: parameters"),
        dtype=raw.get("dtype"),
        out_dtype=raw.get("out_dtype"),
        tokenizer_source=tok,
        chat_template=raw.get("chat_template"),
        from_models="models" in raw,
        raw=raw,
    )


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
            if not ok or lr[0] < 0 or lr[1] <= lr[0]:
                raise RecipeError(
                    f"{w}: layer_range must be [start, end) with 0 <= start < end, got {lr!r}"
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
