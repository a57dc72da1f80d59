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
from mlxmerge.merge.methods import kernels, row_blocks, sce_rows
from mlxmerge.merge.methods.sparsify import RESCALE_MODES, check_della, derive_key
from mlxmerge.merge.methods.task_arithmetic import DISJOINT_MEAN, ELECT
from mlxmerge.merge.params import (
    REQUIRED,
    Param,
    choice,
    flag,
    from_default,
    gradients,
    leaves,
    number,
    whole,
)

__all__ = [
    "METHODS", "REQUIRED", "MethodSpec", "Param", "call_method", "check_params", "derive_key",
]  # fmt: skip


# Recipe names that are Python keywords map to a trailing underscore in the function signature.
_KWARG = {"lambda": "lambda_"}


@dataclass(frozen=True)
class MethodSpec:
    """One merge method: its function and what a recipe may set for it.

    A row declares ``tensor_params``/``global_params`` as ``{name: Param}``; once built, the spec
    holds every Param in ``params`` and the two dicts map names to defaults (what the runner
    fills in). A bare value instead of a Param is read as an undocumented parameter with that
    default (a test flags it).
    """

    fn: Callable[..., mx.array]
    """Pure function ``(tensors, base, *, params) -> mx.array`` over float32 arrays."""
    tensor_params: dict[str, Any]
    """Per-model parameters: name → default (``REQUIRED`` when the recipe must set them)."""
    global_params: dict[str, Any]
    """Global parameters: name → default."""
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
    """Allowed values of string parameters given as bare defaults (a Param carries its own)."""
    params: dict[str, Param] = field(default_factory=dict)
    """Every parameter's Param, per-model ones first (filled from the two dicts)."""
    blocked: Callable[..., mx.array | None] | None = None
    """The same merge, memory-bounded: ``(tensors, base, out_dtype, *, params) -> mx.array``
    over inputs of one shape in their stored dtype, returned evaluated in ``out_dtype`` with
    float32 temporaries the size of a row block (compiled kernels); None when these params or
    this shape are not supported, and the runner calls ``fn`` on float32 copies instead."""

    def __post_init__(self):
        params = dict(self.params)
        for group in (self.tensor_params, self.global_params):
            for name, p in group.items():
                if name not in params or isinstance(p, Param):
                    params[name] = (
                        p if isinstance(p, Param) else from_default(p, self.choices.get(name, ()))
                    )
        object.__setattr__(self, "params", params)
        for attr in ("tensor_params", "global_params"):
            defaults = {
                k: (v.default if isinstance(v, Param) else v)
                for k, v in getattr(self, attr).items()
            }
            object.__setattr__(self, attr, defaults)
        choices = {k: p.choices for k, p in params.items() if p.kind == "choice"}
        object.__setattr__(self, "choices", choices)


# Parameters shared by the task-arithmetic family (mergekit's generalized_task_arithmetic).
_WEIGHT_GTA = number("Scale of this model's task vector (model − base).")
_DENSITY = number("Fraction of task-vector entries kept.", 1.0, 0, 1)
_LAMBDA = number("Scale of the merged task vector before it is added to the base.", 1.0)
_INT8_MASK = flag("mergekit stores masks as int8 to save memory; accepted, no effect here.", False)
_RESCALE_MODE = choice(
    "With rescale: l1 keeps the task vector's L1 norm (mergekit); inverse_p divides by the "
    "keep probability (papers).",
    "l1",
    RESCALE_MODES,
)
_ELECT = choice(
    "TIES sign election: weighted sign(Σwᵢδᵢ) (mergekit) or unweighted sign(Σδᵢ) (paper).",
    "weighted",
    ELECT,
)
_DISJOINT_MEAN = choice(
    "With normalize: divide by the sum of agreeing weights (weight) or their count (count).",
    "weight",
    DISJOINT_MEAN,
)
_GAMMA = number("Fraction of the largest |δ| dropped as outliers (breadcrumbs).", 0.01, 0, 1)
_EPSILON = number(
    "Spread of the keep probability around density (DELLA); density ± epsilon stays in (0, 1).",
    0.15,
    0,
)
_TRIM_SCOPE = choice(
    "TIES trim per tensor (mergekit) or one threshold over each model's whole task vector (paper).",
    "tensor",
    ("tensor", "model"),
)
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


def _gta_spec(fn, *, normalize, rescale, consensus, sparsify, paper, summary, extra_tensor=(),
              extra_global=()):  # fmt: skip
    """A row of the task-arithmetic family: which sparsification, consensus and defaults."""
    density = _DENSITY
    if sparsify == "none":  # mergekit accepts density for task_arithmetic and ignores it
        density = number("Accepted as in mergekit; no effect (nothing is dropped).", 1.0, 0, 1)
    tensor_params = {"weight": _WEIGHT_GTA, "density": density, **dict(extra_tensor)}
    global_params = {
        "lambda": _LAMBDA,
        "int8_mask": _INT8_MASK,
        "normalize": flag("Divide by the sum of the weights (of the agreeing models).", normalize),
        "rescale": flag(
            "Rescale the kept task-vector entries after dropping (see rescale_mode).", rescale
        ),
    }
    if sparsify != "none":
        global_params["rescale_mode"] = _RESCALE_MODE
    if consensus:
        global_params.update(elect=_ELECT, disjoint_mean=_DISJOINT_MEAN)
    global_params.update(extra_global)
    return MethodSpec(
        fn=fn,
        blocked=row_blocks.blocked,
        tensor_params=tensor_params,
        global_params=global_params,
        base="required",
        random=sparsify in ("random", "della_magprune"),
        embed_rectify="base",
        paper=paper,
        summary=summary,
    )


_RAM_EPSILON = number("|task-vector entry| above which a model counts as changing it.", 1e-5, 0)
_INTERP_WEIGHT = number("Relative weight of this model in the interpolation.")

METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        fn=m.linear,
        blocked=kernels.linear,
        tensor_params={"weight": number("Weight of this model in the average.")},
        global_params={"normalize": flag("Divide by the sum of the weights.", True)},
        base="none",
        embed_rectify="common",
        paper="Model soups: averaging weights of multiple fine-tuned models improves accuracy "
        "without increasing inference time — https://arxiv.org/abs/2203.05482",
        summary="Weighted average Σwᵢxᵢ/Σwᵢ.",
    ),
    "slerp": MethodSpec(
        fn=m.slerp,
        blocked=kernels.slerp,
        tensor_params={},
        global_params={
            "t": number("Position on the arc: 0 gives the base, 1 the other model.", REQUIRED, 0, 1)
        },
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
        blocked=kernels.nuslerp,
        tensor_params={"weight": _INTERP_WEIGHT},
        global_params={
            "nuslerp_flatten": flag("Interpolate each tensor as one flat vector.", True),
            "nuslerp_row_wise": flag(
                "Without flattening: interpolate rows (true) or columns (false).", False
            ),
        },
        base="optional",
        embed_rectify="common",
        min_models=2,
        max_models=2,
        paper="NuSLERP (mergekit PR #357) — https://github.com/arcee-ai/mergekit/pull/357",
        summary="SLERP of two models with t = w₂/(w₁+w₂); with a base, SLERP of task vectors.",
    ),
    "multislerp": MethodSpec(
        fn=m.multislerp,
        blocked=kernels.multislerp,
        tensor_params={"weight": _INTERP_WEIGHT},
        global_params={
            "normalize_weights": flag("Divide the weights by their sum.", True),
            "eps": number("Added to norms so a zero tensor does not divide by zero.", 1e-8, 0),
        },
        base="optional",
        embed_rectify="common",
        min_models=2,
        paper="Multi-SLERP (Goddard) — https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        summary="Weighted spherical barycentre of any number of models (one tangent step).",
    ),
    "karcher": MethodSpec(
        fn=m.karcher,
        blocked=kernels.karcher,
        tensor_params={"weight": number("Weight of this model in the mean (none: equal).", None)},
        global_params={
            "max_iter": whole("Most fixed-point iterations of the mean.", 10, 1),
            "tol": number("Stop when the tangent step's norm is below this.", 1e-5, 0),
        },
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
        extra_global={"trim_scope": _TRIM_SCOPE},
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
        extra_tensor={"gamma": _GAMMA},
        paper=_BREADCRUMBS_PAPER,
        summary="Drop the largest gamma and smallest |δ|, keep density, sum.",
    ),
    "breadcrumbs_ties": _gta_spec(
        m.breadcrumbs_ties,
        normalize=False,
        rescale=False,
        consensus=True,
        sparsify="magnitude_outliers",
        extra_tensor={"gamma": _GAMMA},
        paper=_BREADCRUMBS_PAPER,
        summary="Breadcrumbs masks, then TIES sign election.",
    ),
    "della": _gta_spec(
        m.della,
        normalize=True,
        rescale=True,
        consensus=True,
        sparsify="della_magprune",
        extra_tensor={"epsilon": _EPSILON},
        paper=_DELLA_PAPER,
        summary="Drop with magnitude-ranked probability, rescale, TIES election, normalized.",
    ),
    "della_linear": _gta_spec(
        m.della_linear,
        normalize=False,
        rescale=True,
        consensus=False,
        sparsify="della_magprune",
        extra_tensor={"epsilon": _EPSILON},
        paper=_DELLA_PAPER,
        summary="DELLA drop and rescale, then sum.",
    ),
    "sce": MethodSpec(
        fn=m.sce,
        blocked=sce_rows.blocked,
        tensor_params={},
        global_params={
            "select_topk": number(
                "Fraction of entries kept, those that vary most across models.", 1.0, 0, 1
            ),
            "int8_mask": _INT8_MASK,
        },
        base="required",
        embed_rectify="base",
        paper="FuseChat: Knowledge Fusion of Chat Models — https://arxiv.org/abs/2408.07990",
        summary="Select high-variance entries, weight models by delta energy, erase sign conflicts.",
    ),
    "model_stock": MethodSpec(
        fn=m.model_stock,
        blocked=kernels.model_stock,
        tensor_params={},
        global_params={
            "filter_wise": flag("Compute the interpolation ratio per row, not per tensor.", False)
        },
        base="required",
        embed_rectify="common",
        min_models=2,
        paper="Model Stock: All we need is just a few fine-tuned models — "
        "https://arxiv.org/abs/2403.19522",
        summary="Interpolate base → mean of fine-tunes by t from their mutual angle.",
    ),
    "nearswap": MethodSpec(
        fn=m.nearswap,
        blocked=kernels.nearswap,
        tensor_params={},
        global_params={
            "t": number(
                "Distance below which the other model's value replaces the base's.", REQUIRED, 0
            )
        },
        base="required",
        embed_rectify="base",
        min_models=1,
        max_models=1,
        paper="NearSwap (alchemonaut) — https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        summary="Take the other model's value where it is within t of the base.",
    ),
    "arcee_fusion": MethodSpec(
        fn=m.arcee_fusion,
        blocked=kernels.arcee_fusion,
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
        blocked=kernels.ram,
        tensor_params={},
        global_params={"epsilon": _RAM_EPSILON},
        base="required",
        embed_rectify="base",
        paper="Reinforced Agent Merging — https://arxiv.org/abs/2601.13572",
        summary="Task-vector entries one model changes are kept; shared ones are averaged.",
    ),
    "ramplus_tl": MethodSpec(
        fn=m.ramplus_tl,
        blocked=kernels.ramplus_tl,
        tensor_params={},
        global_params={
            "r": number("Strength of the boost of each model's unique entries.", 0.1),
            "alpha": number("Cap on the shared/unique ratio in that boost.", 0.2, 0),
            "epsilon": _RAM_EPSILON,
        },
        base="required",
        embed_rectify="base",
        paper="Reinforced Agent Merging (RAM+) — https://arxiv.org/abs/2601.13572",
        summary="RAM with unique entries scaled by 1 + r·clip(shared/unique, 0, alpha).",
    ),
    "passthrough": MethodSpec(
        fn=m.passthrough,
        blocked=kernels.passthrough,
        tensor_params={"scale": number("Factor the copied tensor is multiplied by.", 1.0)},
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


def _check_value(method: str, key: str, value, where: str, spec: MethodSpec) -> None:
    param = spec.params[key]
    if not param.gradient and any(True for _ in gradients(value)):
        raise RecipeError(
            f"{where}: parameter {key!r} of {method} takes one value ({param.range_text()}), "
            f"not a gradient; got {value!r}."
        )
    for leaf in leaves(value):
        if not param.accepts(leaf):
            raise RecipeError(
                f"{where}: parameter {key!r} of {method} must be {param.range_text()}, "
                f"got {leaf!r}."
            )


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
        _check_value(method_name, key, value, where, spec)
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


def parameters_markdown() -> str:
    """The parameter tables of docs/merging-methods.md, one per method, from METHODS.

    docs/merging-methods.md holds this text between ``<!-- parameters:begin -->`` and
    ``<!-- parameters:end -->``; a test keeps the two equal.
    """
    lines = []
    for name in sorted(METHODS):
        spec = METHODS[name]
        base = {"none": "no base", "optional": "base optional", "required": "base required"}
        lines += [f"### `{name}` ({base[spec.base]})", ""]
        if not spec.params:
            lines += ["No parameters.", ""]
            continue
        lines += ["| parameter | scope | values | default | meaning |", "|---|---|---|---|---|"]
        for p, param in spec.params.items():
            scope = "per model" if p in spec.tensor_params else "global"
            values = param.range_text() + (", gradient or filtered" if param.gradient else "")
            meaning = param.meaning.replace("|", "\\|")  # a bare | would end the table cell
            lines.append(f"| `{p}` | {scope} | {values} | {param.default_text()} | {meaning} |")
        lines.append("")
    return "\n".join(lines)
