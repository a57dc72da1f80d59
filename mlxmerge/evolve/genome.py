"""mergekit-evolve's genome: the merge parameters CMA-ES searches, and the recipe they stand for.

A genotype is a float array of shape ``(groups, models, sets, params)`` (searched flattened):

* ``groups``: ``layers / layer_granularity`` consecutive layer groups (1 when the granularity is 0);
* ``models``: the genome's models, in order;
* ``sets``: one parameter set per ``filters`` entry (a substring of the tensor name, e.g.
  ``self_attn``), plus one for every other tensor;
* ``params``: the method's searched parameters, ``METHOD_PARAMS`` (weight first).

Mapping to a recipe, as ``mergekit/evo/genome.py`` (``genotype_merge_config``) does it:

* ``density`` = clamp(|gene|, 0, 1); ``weight`` = |gene| unless ``allow_negative_weights``;
* not ``smooth``: one output slice per layer group, every model a source of it with that group's
  values (a ``[{filter, value}]`` list when there are filters), the base model added as a
  parameterless source; ``smooth``: one ``models:`` entry per model whose parameters are gradients
  over the groups (a single group gives a scalar);
* ``normalize`` defaults to true for ``linear``, ``ties`` and ``dare_ties``; ``int8_mask: true``
  for the methods that take it;
* ``slerp`` (exactly two models, no filters, not smooth): per group, t = softmax(genes)[other],
  i.e. e^{g_other} / (e^{g_base} + e^{g_other}). mergekit instead makes the model with the larger
  gene the slice's base and t = softmax of the smaller one (t ≤ 0.5); since
  slerp(a, b, t) = slerp(b, a, 1 − t) both give the same model, and a fixed ``base_model`` keeps the
  recipe one that ``mlxmerge merge`` and mergekit both read.

The starting genotype is mergekit's: weight 1/models, every other parameter 1 (or uniform [0, 1)
values with ``random_init``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mlxmerge.errors import RecipeError

METHOD_PARAMS = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "slerp": ("t",),
}
NEEDS_BASE = ("task_arithmetic", "ties", "dare_ties")
NORMALIZED_BY_DEFAULT = ("linear", "ties", "dare_ties")


@dataclass(frozen=True)
class GenomeDefinition:
    """The ``genome:`` block of a mergekit-evolve config."""

    models: tuple[str, ...]
    """Models whose parameters are searched (the base model may be one of them)."""
    merge_method: str
    """One of ``METHOD_PARAMS``."""
    base_model: str | None = None
    """Required by task_arithmetic, ties and dare_ties; added as a source when not in ``models``."""
    tokenizer_source: str | None = None
    """Copied into every recipe."""
    layer_granularity: int = 0
    """Layers per group with their own parameters (0: one group for all layers)."""
    normalize: bool | None = None
    """The recipe's ``normalize``; None: true for linear, ties and dare_ties."""
    allow_negative_weights: bool = False
    """Search signed weights (otherwise |gene| is used)."""
    filters: tuple[str, ...] = field(default_factory=tuple)
    """Tensor-name substrings that get their own parameter set."""
    smooth: bool = False
    """Parameters as gradients over the groups instead of one value per group."""

    def check(self, where: str) -> None:
        """Raise ``RecipeError`` for combinations mergekit-evolve also refuses."""
        if self.merge_method not in METHOD_PARAMS:
            raise RecipeError(
                f"{where}: merge_method {self.merge_method!r} cannot be evolved; "
                f"accepted: {', '.join(METHOD_PARAMS)}"
            )
        if len(self.models) < 1 or len(set(self.models)) != len(self.models):
            raise RecipeError(f"{where}: models must list distinct models")
        if self.merge_method in NEEDS_BASE and not self.base_model:
            raise RecipeError(f"{where}: {self.merge_method} needs a base_model")
        if self.layer_granularity < 0:
            raise RecipeError(f"{where}: layer_granularity must be 0 or a positive layer count")
        if any(not isinstance(f, str) or not f for f in self.filters):
            raise RecipeError(f"{where}: filters must be non-empty tensor-name substrings")
        if self.merge_method == "slerp":
            if self.smooth or self.filters:
                raise RecipeError(
                    f"{where}: slerp supports neither smooth nor filters (as mergekit)"
                )
            if len(self.models) != 2:
                raise RecipeError(
                    f"{where}: slerp evolves exactly two models, got {len(self.models)}"
                )
            if self.base_model and self.base_model not in self.models:
                raise RecipeError(f"{where}: slerp's base_model must be one of its two models")
        elif len(self.models) + (self.base_model not in self.models if self.base_model else 0) < 2:
            raise RecipeError(f"{where}: a merge needs at least two models")


class Genome:
    """A ``GenomeDefinition`` on models with ``num_layers`` layers."""

    def __init__(self, definition: GenomeDefinition, num_layers: int):
        g = definition.layer_granularity
        if g > 0 and num_layers % g:
            raise RecipeError(
                f"genome: layer_granularity {g} does not divide the models' {num_layers} layers"
            )
        self.definition = definition
        self.num_layers = num_layers
        self.params = METHOD_PARAMS[definition.merge_method]
        self.shape = (
            num_layers // g if g > 0 else 1,
            len(definition.models),
            len(definition.filters) + 1,
            len(self.params),
        )

    @property
    def size(self) -> int:
        """Number of searched values."""
        return math.prod(self.shape)

    def initial(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """mergekit's starting genotype (flat): weight 1/models, the rest 1; uniform [0, 1)
        from ``rng`` when given (``random_init``)."""
        if rng is not None:
            return rng.random(self.size)
        x = np.ones(self.shape)
        x[..., 0] = 1 / self.shape[1]
        return x.reshape(-1)

    def values(self, genes: np.ndarray) -> dict[str, np.ndarray]:
        """Each searched parameter, ``(groups, models, sets)``, after mergekit's transforms;
        slerp: ``{"t": (groups,)}``, t from the base model towards the other one."""
        x = np.asarray(genes, dtype=np.float64).reshape(self.shape)
        if self.definition.merge_method == "slerp":
            return {"t": self._slerp_t(x)}
        out = {}
        for i, p in enumerate(self.params):
            v = x[..., i]
            if p == "density":
                v = np.clip(np.abs(v), 0.0, 1.0)
            elif p == "weight" and not self.definition.allow_negative_weights:
                v = np.abs(v)
            out[p] = v
        return out

    def recipe(self, genes: np.ndarray, dtype: str = "bfloat16") -> dict:
        """The mergekit recipe of ``genes`` (a dict ready for ``yaml.safe_dump``)."""
        d = self.definition
        recipe: dict = {"merge_method": d.merge_method}
        if d.merge_method == "slerp":
            base = d.base_model or d.models[0]
            recipe["base_model"] = base
            recipe["slices"] = self._slerp_slices(genes, base)
        else:
            if d.base_model:
                recipe["base_model"] = d.base_model
            values = self.values(genes)
            if d.smooth:
                recipe["models"] = self._smooth_models(values)
            else:
                recipe["slices"] = self._slices(values)
            recipe["parameters"] = self._globals()
        recipe["dtype"] = dtype
        if d.tokenizer_source:
            recipe["tokenizer_source"] = d.tokenizer_source
        return recipe

    # -- the pieces ------------------------------------------------------------------------------

    def _globals(self) -> dict:
        from mlxmerge.merge.registry import get_method

        d = self.definition
        normalize = d.normalize
        if normalize is None:
            normalize = d.merge_method in NORMALIZED_BY_DEFAULT
        declared = get_method(d.merge_method).global_params
        wanted = {"normalize": bool(normalize), "int8_mask": True}
        return {k: v for k, v in wanted.items() if k in declared}

    def _filtered(self, per_set: list) -> list | object:
        # One set: the bare value; several: mergekit's [{filter, value}], the catch-all last.
        filters = list(self.definition.filters)
        if not filters:
            return per_set[0]
        return [{"filter": f, "value": v} for f, v in zip(filters + [None], per_set)]

    def _layer_range(self, group: int) -> list[int]:
        step = self.num_layers // self.shape[0]
        return [group * step, (group + 1) * step]

    def _slices(self, values: dict[str, np.ndarray]) -> list[dict]:
        d = self.definition
        slices = []
        for g in range(self.shape[0]):
            sources = []
            for m, model in enumerate(d.models):
                params = {
                    p: self._filtered([float(v[g, m, s]) for s in range(self.shape[2])])
                    for p, v in values.items()
                }
                sources.append(
                    {"model": model, "layer_range": self._layer_range(g), "parameters": params}
                )
            if d.base_model and d.base_model not in d.models:
                sources.append({"model": d.base_model, "layer_range": self._layer_range(g)})
            slices.append({"sources": sources})
        return slices

    def _smooth_models(self, values: dict[str, np.ndarray]) -> list[dict]:
        d = self.definition
        models = []
        for m, model in enumerate(d.models):
            params = {}
            for p, v in values.items():
                per_set = []
                for s in range(self.shape[2]):
                    gradient = [float(x) for x in v[:, m, s]]
                    per_set.append(gradient[0] if len(gradient) == 1 else gradient)
                params[p] = self._filtered(per_set)
            models.append({"model": model, "parameters": params})
        if d.base_model and d.base_model not in d.models:
            models.append({"model": d.base_model})
        return models

    def _slerp_t(self, x: np.ndarray) -> np.ndarray:
        d = self.definition
        b = d.models.index(d.base_model or d.models[0])
        # softmax over the pair, computed stably: e^{g_other} / (e^{g_base} + e^{g_other})
        return 1.0 / (1.0 + np.exp(x[:, b, 0, 0] - x[:, 1 - b, 0, 0]))

    def _slerp_slices(self, genes: np.ndarray, base: str) -> list[dict]:
        d = self.definition
        b = d.models.index(base)
        t = self._slerp_t(np.asarray(genes, dtype=np.float64).reshape(self.shape))
        slices = []
        for g in range(self.shape[0]):
            sources = [
                {"model": d.models[i], "layer_range": self._layer_range(g)} for i in (b, 1 - b)
            ]
            slices.append({"sources": sources, "parameters": {"t": float(t[g])}})
        return slices
