"""The table of merge methods: names, parameters and defaults as in mergekit's registry.

Each entry maps a mergekit method name to one pure function from ``mlxmerge.merge.methods`` plus
what a recipe may set for it. ``check_params`` rejects unknown or misspelt keys and bad values
before any tensor is loaded; ``call_method`` fills defaults and calls the function.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mlxmerge.errors import RecipeError
from mlxmerge.merge import methods as m
from mlxmerge.merge.methods.sparsify import RESCALE_MODES, check_della, derive_key
from mlxmerge.merge.methods.task_arithmetic import DISJOINT_MEAN, ELECT

__all__ = ["METHODS", "REQUIRED", "MethodSpec", "call_method", "check_params", "derive_key"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Sentinel default of a parameter the recipe must set."""

# Recipe names that are Python keywords map to a trailing underscore in the function signature.
_KWARG = {"lambda": "lambda_"}


@dataclass(frozen=True)
class MethodSpec:
    """One merge method: its function and what a recipe may set for it."""

    fn: Callable[..., mx.array]
    """Pure function ``(tensors, base, *, params) -> mx.array`` over float32 arrays."""
    tensor_params: dict[str, Any]
    """Per-model parameters and defaults (``REQUIRED`` when the recipe must set them)."""
    global_params: dict[str, Any]
    """Global parameters and defaults."""
    base: str
    """'none' (all models in ``tensors``), 'optional' or 'required' (base passed apart)."""
    random: bool = False
    """Needs one PRNG key per model (``keys=``, from ``derive_key``)."""
    embed_rectify: str = "base"
    """Vocab-size mismatch: 'common' crops all to the common sub-matrix, 'base' to the base."""
    min_models: int = 1
    """Fewest models besides the base."""
    max_models: int | None = None
    """Most models besides the base (None: no limit)."""
    paper: str = ""
    summary: str = ""
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Allowed values of string parameters."""


_GTA_GLOBAL = {"lambda": 1.0, "int8_mask": False}
_TIES_EXTRA = {"elect": "weighted", "disjoint_mean": "weight"}
_GTA_CHOICES = {"rescale_mode": RESCALE_MODES, "elect": ELECT, "disjoint_mean": DISJOINT_MEAN}
_DARE_PAPER = (
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
    "Lunch — https://arxiv.org/abs/2311.03099"
)
_BREADCRUMBS_PAPER = (
    "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks — "
    "https://arxiv.org/abs/2312.06795"
)
_DELLA_PAPER = (
    "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling — "
    "https://arxiv.org/abs/2406.11617"
)


def _gta_spec(fn, *, normalize, rescale, consensus, sparsify, paper, summary, extra_tensor=()):
    tensor_params = {"weight": REQUIRED, "density": 1.0}
    tensor_params.update(extra_tensor)
    global_params = dict(_GTA_GLOBAL, normalize=normalize, rescale=rescale)
    if sparsify != "none":
        global_params["rescale_mode"] = "l1"
    if consensus:
        global_params.update(_TIES_EXTRA)
    return MethodSpec(
        fn=fn,
        tensor_params=tensor_params,
        global_params=global_params,
        base="required",
        random=sparsify in ("random", "della_magprune"),
        embed_rectify="base",
        paper=paper,
        summary=summary,
        choices={k: v for k, v in _GTA_CHOICES.items() if k in global_params},
    )


_TRIM_SCOPES = ("tensor", "model")

METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        fn=m.linear,
        tensor_params={"weight": REQUIRED},
        global_params={"normalize": True},
        base="none",
        embed_rectify="common",
        paper="Model soups: averaging weights of multiple fine-tuned models improves accuracy "
        "without increasing inference time — https://arxiv.org/abs/2203.05482",
        summary="Weighted average Σwᵢxᵢ/Σwᵢ.",
    ),
    "slerp": MethodSpec(
        fn=m.slerp,
        tensor_params={},
        global_params={"t": REQUIRED},
        base="required",
        embed_rectify="common",
        min_models=1,
        max_models=1,
        paper="Animating rotation with quaternion curves (Shoemake, SIGGRAPH 1985) — "
        "https://doi.org/10.1145/325165.325242",
        summary="Spherical interpolation from the base (t=0) to the other model (t=1).",
    ),
    "nuslerp": MethodSpec(
        fn=m.nuslerp,
        tensor_params={"weight": REQUIRED},
        global_params={"nuslerp_flatten": True, "nuslerp_row_wise": False},
        base="optional",
        embed_rectify="common",
        min_models=2,
        max_models=2,
        paper="NuSLERP (mergekit PR #357) — https://github.com/arcee-ai/mergekit/pull/357",
        summary="SLERP of two models with t = w₂/(w₁+w₂); with a base, SLERP of task vectors.",
    ),
    "multislerp": MethodSpec(
        fn=m.multislerp,
        tensor_params={"weight": REQUIRED},
        global_params={"normalize_weights": True, "eps": 1e-8},
        base="optional",
        embed_rectify="common",
        min_models=2,
        paper="Multi-SLERP (Goddard) — https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        summary="Weighted spherical barycentre of any number of models (one tangent step).",
    ),
    "karcher": MethodSpec(
        fn=m.karcher,
        tensor_params={"weight": None},
        global_params={"max_iter": 10, "tol": 1e-5},
        base="none",
        embed_rectify="common",
        min_models=2,
        paper="Karcher (Riemannian) mean — https://en.wikipedia.org/wiki/Karcher_mean",
        summary="Iterated weighted Riemannian mean on the sphere, rescaled by the mean norm.",
    ),
    "task_arithmetic": _gta_spec(
        m.task_arithmetic,
        normalize=False,
        rescale=False,
        consensus=False,
        sparsify="none",
        paper="Editing Models with Task Arithmetic — https://arxiv.org/abs/2212.04089",
        summary="base + λ·Σwᵢ(xᵢ − base).",
    ),
    "ties": _gta_spec(
        m.ties,
        normalize=True,
        rescale=False,
        consensus=True,
        sparsify="magnitude",
        paper="TIES-Merging: Resolving Interference When Merging Models — "
        "https://arxiv.org/abs/2306.01708",
        summary="Trim to the top-density |δ|, elect signs, disjoint mean of agreeing deltas.",
    ),
    "dare_linear": _gta_spec(
        m.dare_linear,
        normalize=False,
        rescale=True,
        consensus=False,
        sparsify="random",
        paper=_DARE_PAPER,
        summary="Drop δ entries at random (keep prob. density), rescale, sum.",
    ),
    "dare_ties": _gta_spec(
        m.dare_ties,
        normalize=False,
        rescale=True,
        consensus=True,
        sparsify="random",
        paper=_DARE_PAPER,
        summary="DARE drop and rescale, then TIES sign election.",
    ),
    "breadcrumbs": _gta_spec(
        m.breadcrumbs,
        normalize=False,
        rescale=False,
        consensus=False,
        sparsify="magnitude_outliers",
        extra_tensor={"gamma": 0.01},
        paper=_BREADCRUMBS_PAPER,
        summary="Drop the largest gamma and smallest |δ|, keep density, sum.",
    ),
    "breadcrumbs_ties": _gta_spec(
        m.breadcrumbs_ties,
        normalize=False,
        rescale=False,
        consensus=True,
        sparsify="magnitude_outliers",
        extra_tensor={"gamma": 0.01},
        paper=_BREADCRUMBS_PAPER,
        summary="Breadcrumbs masks, then TIES sign election.",
    ),
    "della": _gta_spec(
        m.della,
        normalize=True,
        rescale=True,
        consensus=True,
        sparsify="della_magprune",
        extra_tensor={"epsilon": 0.15},
        paper=_DELLA_PAPER,
        summary="Drop with magnitude-ranked probability, rescale, TIES election, normalized.",
    ),
    "della_linear": _gta_spec(
        m.della_linear,
        normalize=False,
        rescale=True,
        consensus=False,
        sparsify="della_magprune",
        extra_tensor={"epsilon": 0.15},
        paper=_DELLA_PAPER,
        summary="DELLA drop and rescale, then sum.",
    ),
    "sce": MethodSpec(
        fn=m.sce,
        tensor_params={},
        global_params={"select_topk": 1.0, "int8_mask": False},
        base="required",
        embed_rectify="base",
        paper="FuseChat: Knowledge Fusion of Chat Models — https://arxiv.org/abs/2408.07990",
        summary="Select high-variance entries, weight models by delta energy, erase sign conflicts.",
    ),
    "model_stock": MethodSpec(
        fn=m.model_stock,
        tensor_params={},
        global_params={"filter_wise": False},
        base="required",
        embed_rectify="common",
        min_models=2,
        paper="Model Stock: All we need is just a few fine-tuned models — "
        "https://arxiv.org/abs/2403.19522",
        summary="Interpolate base → mean of fine-tunes by t from their mutual angle.",
    ),
    "nearswap": MethodSpec(
        fn=m.nearswap,
        tensor_params={},
        global_params={"t": REQUIRED},
        base="required",
        embed_rectify="base",
        min_models=1,
        max_models=1,
        paper="NearSwap (alchemonaut) — https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        summary="Take the other model's value where it is within t of the base.",
    ),
    "arcee_fusion": MethodSpec(
        fn=m.arcee_fusion,
        tensor_params={},
        global_params={},
        base="required",
        embed_rectify="common",
        min_models=1,
        max_models=1,
        paper="Arcee Fusion (mergekit v0.1, no paper) — https://arcee.ai",
        summary="Take the other model's value where |δ|·KL(softmax) passes median + 1.5·IQR.",
    ),
    "ram": MethodSpec(
        fn=m.ram,
        tensor_params={},
        global_params={"epsilon": 1e-5},
        base="required",
        embed_rectify="base",
        paper="Reinforced Agent Merging — https://arxiv.org/abs/2601.13572",
        summary="Task-vector entries one model changes are kept; shared ones are averaged.",
    ),
    "ramplus_tl": MethodSpec(
        fn=m.ramplus_tl,
        tensor_params={},
        global_params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
        base="required",
        embed_rectify="base",
        paper="Reinforced Agent Merging (RAM+) — https://arxiv.org/abs/2601.13572",
        summary="RAM with unique entries scaled by 1 + r·clip(shared/unique, 0, alpha).",
    ),
    "passthrough": MethodSpec(
        fn=m.passthrough,
        tensor_params={"scale": 1.0},
        global_params={},
        base="none",
        embed_rectify="common",
        min_models=1,
        max_models=1,
        paper="(no paper: copies one model's tensor, for frankenmerges)",
        summary="The one input tensor, times scale.",
    ),
}


def get_method(name: str) -> MethodSpec:
    """The spec of a merge method; an unknown name raises RecipeError naming the closest."""
    spec = METHODS.get(name)
    if spec is not None:
        return spec
    close = difflib.get_close_matches(str(name).replace("-", "_"), METHODS, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RecipeError(
        f"Unknown merge method {name!r}.{hint} Known methods: {', '.join(sorted(METHODS))}."
    )


def _leaves(value):
    """Scalar values inside a parameter: a number, a gradient list, or [{filter, value}, ...]."""
    if isinstance(value, dict):
        if "value" in value:
            yield from _leaves(value["value"])
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
        return
    yield value


def _check_value(method: str, key: str, value, where: str, spec: MethodSpec) -> None:
    def bad(expect: str):
        raise RecipeError(
            f"{where}: parameter {key!r} of {method} must be {expect}, got {value!r}."
        )

    default = spec.global_params.get(key, spec.tensor_params.get(key))
    if key in spec.choices:
        if value not in spec.choices[key]:
            bad("one of " + ", ".join(spec.choices[key]))
        return
    if isinstance(default, bool) or key in ("normalize", "rescale"):
        if not isinstance(value, bool):
            bad("true or false")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        bad("a number")
    unit = {"density", "gamma", "select_topk"}
    if key in unit or (key == "t" and method == "slerp"):
        if not 0 <= value <= 1:
            bad("in [0, 1]")
    elif key in ("epsilon", "tol", "eps", "t") and value < 0:
        bad(">= 0")
    elif key == "max_iter" and (value < 1 or int(value) != value):
        bad("a whole number >= 1")


def check_params(
    method_name: str, params: dict[str, Any], where: str, *, scope: str = "merged"
) -> None:
    """Reject unknown, misspelt, missing or out-of-range parameters of a merge method.

    ``scope``: 'merged' (default: the effective parameters of one model, globals included;
    every required one must be present), 'global' (a recipe's top-level ``parameters:``, which
    may also hold per-model defaults) or 'model' (a model's own ``parameters:``: per-model
    ones only). ``where`` names the place in the recipe for the message.
    """
    spec = get_method(method_name)
    if scope == "model":
        accepted = dict(spec.tensor_params)
    else:
        accepted = {**spec.tensor_params, **spec.global_params}
    for key, value in params.items():
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            if scope == "model" and key in spec.global_params:
                hint = " It is a global parameter: set it under the top-level parameters."
            names = ", ".join(sorted(accepted)) or "none"
            raise RecipeError(
                f"{where}: unknown parameter {key!r} for merge method {method_name!r}.{hint} "
                f"Accepted: {names}."
            )
        for leaf in _leaves(value):
            _check_value(method_name, key, leaf, where, spec)
    if scope == "merged":
        for key, default in accepted.items():
            if default is REQUIRED and key not in params:
                raise RecipeError(
                    f"{where}: merge method {method_name!r} requires parameter {key!r}."
                )
    d, e = params.get("density"), params.get("epsilon")
    if "epsilon" in accepted and isinstance(d, numbers.Real) and isinstance(e, numbers.Real):
        check_della(d, e, f"{where}: {method_name}")


def call_method(
    name: str,
    tensors: list[mx.array],
    base: mx.array | None,
    params: dict[str, Any],
    keys: list[mx.array] | None = None,
) -> mx.array:
    """Call a method with recipe-named parameters (per-model ones as lists), defaults filled."""
    spec = get_method(name)
    kwargs: dict[str, Any] = {}
    for key, default in {**spec.tensor_params, **spec.global_params}.items():
        value = params.get(key, default)
        if value is REQUIRED:
            raise RecipeError(f"merge method {name!r} requires parameter {key!r}.")
        kwargs[_KWARG.get(key, key)] = value
    unknown = set(params) - set(spec.tensor_params) - set(spec.global_params)
    if unknown:
        raise RecipeError(f"unknown parameter(s) {sorted(unknown)} for merge method {name!r}.")
    if spec.random:
        kwargs["keys"] = keys
    return spec.fn(tensors, base, **kwargs)


# TIES paper: trim over each model's whole task vector, not per tensor (the runner's pre-pass).
METHODS["ties"] = MethodSpec(
    **{
        **METHODS["ties"].__dict__,
        "global_params": {**METHODS["ties"].global_params, "trim_scope": "tensor"},
        "choices": {**METHODS["ties"].choices, "trim_scope": _TRIM_SCOPES},
    }
)
