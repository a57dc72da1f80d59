"""Plan a merge from headers alone: every check, every output tensor and its parameters.

Nothing here reads tensor data; ``runner`` computes and writes what the plan lists.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxmerge.errors import RecipeError
from mlxmerge.io import Checkpoint, layer_index, open_checkpoint
from mlxmerge.io.checkpoint import natural_key
from mlxmerge.io.layout import is_input_embedding, layer_structure, renumber_layer
from mlxmerge.merge.layer_config import sliced_layer_fields
from mlxmerge.merge.recipe import Recipe, Slice, parse_recipe, resolve_parameter
from mlxmerge.merge.registry import REQUIRED, MethodSpec, check_params, get_method

log = logging.getLogger(__name__)

# Config fields that make two checkpoints different architectures (mergekit needs --allow-crimes).
ARCHITECTURE_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "moe_intermediate_size", "num_experts",
    "num_local_experts",
)  # fmt: skip


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    inputs: list[tuple[int, str]]  # (model index, tensor name) of the merged (non-base) inputs
    base: tuple[int, str] | None
    t: float
    global_params: dict
    tensor_params: dict[str, list]
    is_embed: bool = False
    vocab: object | None = None  # merge.vocab.Vocabulary: rows re-indexed to the output tokenizer


@dataclass
class MergePlan:
    recipe: Recipe
    method: MethodSpec
    models: list[str]
    checkpoints: list[Checkpoint]
    tensors: list[PlannedTensor]
    num_layers: int
    config: dict
    warnings: list[str] = field(default_factory=list)
    trim_thresholds: list[float] | None = None  # set by prepare() for TIES trim_scope: model
    vocab: object | None = None  # merge.vocab.Vocabulary when the recipe builds a tokenizer

    def tensor(self, name: str) -> PlannedTensor:
        return self._by_name[name]

    def __post_init__(self):
        self._by_name = {p.name: p for p in self.tensors}


def is_embedding(name: str) -> bool:
    return "embed_tokens" in name or name.endswith(("lm_head.weight", "wte.weight"))


def stores_head(ckpt: Checkpoint, name: str = "lm_head.weight") -> bool:
    """Whether ``ckpt`` has its own output head: a tied model's redundant lm_head copy does not count."""
    return name in ckpt and ckpt.config_value("tie_word_embeddings") is not True


def is_stacked_experts(name: str, shape: tuple[int, ...]) -> bool:
    # MLX layout stacks MoE experts as (n_experts, out, in) under switch_mlp / experts.
    return len(shape) == 3 and ("switch_mlp" in name or ".experts." in name)


def _check_layer_kinds(tensors: list[PlannedTensor], donor: Checkpoint, donor_ref: str) -> None:
    # The output's config.json is the donor's: each output layer must be the kind it describes.
    want = layer_structure(donor.names())
    for i, got in layer_structure(p.name for p in tensors).items():
        if i in want and got != want[i]:
            odd = min(got ^ want[i]).replace(".N.", f".{i}.")
            raise RecipeError(
                f"output layer {i} is not the kind of layer the config (from {donor_ref}) describes "
                f"at index {i} (differs in {odd}); dense and MoE layers cannot swap places"
            )


def _listed(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} tensor(s) ({', '.join(names[:limit])}{more})"


def _check_same_tensors(recipe: Recipe, ckpts: list[Checkpoint], by_ref: dict[str, int]) -> None:
    """Every source of a slice must hold the tensors its first source holds, and no others.

    The first source lists what is merged: without this, a tensor only another model holds
    is dropped, and one the first model lacks vanishes from the output. ``lm_head.weight`` is
    left to the tied-embedding rule (a tied model's head is its embedding)."""
    structure = {i: layer_structure(c.names()) for i, c in enumerate(ckpts)}

    def outside(i: int, pre: bool) -> set[str]:
        return {n for n in ckpts[i].names() if layer_index(n) is None
                and is_input_embedding(n) == pre and n != "lm_head.weight"}  # fmt: skip

    for k, sl in enumerate(recipe.slices):
        lead = sl.sources[0]
        li = by_ref[lead.model]
        for s in sl.sources[1:]:
            si = by_ref[s.model]
            lacks: list[str] = []
            extra: list[str] = []
            if k == 0:
                lacks += sorted(outside(li, True) - outside(si, True), key=natural_key)
                extra += sorted(outside(si, True) - outside(li, True), key=natural_key)
            for offset in range(lead.layer_range[1] - lead.layer_range[0]):
                a = lead.layer_range[0] + offset
                b = s.layer_range[0] + offset
                want = structure[li].get(a, frozenset())
                got = structure[si].get(b, frozenset())
                lacks += [n.replace(".N.", f".{b}.") for n in sorted(want - got, key=natural_key)]
                extra += [n.replace(".N.", f".{b}.") for n in sorted(got - want, key=natural_key)]
            if k == len(recipe.slices) - 1:
                lacks += sorted(outside(li, False) - outside(si, False), key=natural_key)
                extra += sorted(outside(si, False) - outside(li, False), key=natural_key)
            problems = []
            if lacks:
                problems.append(f"lacks {_listed(lacks)} that {lead.model} holds")
            if extra:
                problems.append(f"holds {_listed(extra)} that {lead.model} lacks")
            if problems:
                raise RecipeError(
                    f"slices[{k}]: {s.model} {'; and '.join(problems)}; every model of a merge "
                    "must hold the same tensors (same architecture and options)"
                )


def _has_layers(ckpt: Checkpoint) -> bool:
    return any(layer_index(n) is not None for n in ckpt.names())


def _shown(value) -> str:
    return "(absent)" if value is None else str(value)


def _check_architectures(
    ckpts: list[Checkpoint], models: list[str], allow_crimes: bool, warnings: list[str]
):
    ref = ckpts[0]
    for ckpt, model in zip(ckpts[1:], models[1:]):
        # Each architecture's own name for a field (GPT-2's n_embd is its hidden_size).
        fields = [(k, ref.config_field(k)[1], ckpt.config_field(k)[1]) for k in ARCHITECTURE_FIELDS]
        diffs = [f"{k} {_shown(a)} vs {_shown(b)}" for k, a, b in fields if a != b]
        if diffs:
            msg = f"{models[0]} and {model} are different architectures ({'; '.join(diffs)})"
            if not allow_crimes:
                raise RecipeError(f"{msg}; pass --allow-crimes to merge them where shapes allow")
            warnings.append(msg)


def plan_merge(recipe: Recipe | str | Path | dict, *, allow_crimes: bool = False) -> MergePlan:
    """Validate ``recipe`` against the checkpoints' headers and list every output tensor."""
    if not isinstance(recipe, Recipe):
        recipe = parse_recipe(recipe)
    spec = get_method(recipe.merge_method)
    method = recipe.merge_method
    check_params(method, recipe.parameters, "parameters", scope="global")
    for i, sl in enumerate(recipe.slices):
        check_params(method, sl.parameters, f"slices[{i}].parameters", scope="global")
        for src in sl.sources:
            check_params(method, src.parameters, f"{src.model} parameters", scope="model")
    base = recipe.base_model
    if spec.base == "required" and not base:
        if spec.max_models == 1:  # slerp, nearswap: the base is one end, not a task-vector origin
            raise RecipeError(
                f"{method} merges exactly two models, base_model and one other; the recipe "
                f"lists {len(recipe.models)} model(s) and sets no base_model"
            )
        raise RecipeError(
            f"{method} needs a base_model (the model the task vectors are taken from)"
        )
    uses_base = bool(base) and spec.base != "none"

    models = recipe.models
    ckpts = [open_checkpoint(m) for m in models]
    by_ref = dict(zip(models, range(len(models))))
    warnings: list[str] = []
    _check_architectures(ckpts, models, allow_crimes, warnings)

    for i, sl in enumerate(recipe.slices):
        for src in sl.sources:
            n = ckpts[by_ref[src.model]].num_layers
            if src.layer_range is None:
                src.layer_range = (0, n)
            if src.layer_range[1] > n:
                raise RecipeError(
                    f"slices[{i}]: layer_range {list(src.layer_range)} of {src.model} is out of range; it has {n} layers"
                )
            if (len(recipe.slices) > 1 or tuple(src.layer_range) != (0, n)) and not _has_layers(
                ckpts[by_ref[src.model]]
            ):
                raise RecipeError(
                    f"slices[{i}]: {src.model} (model_type {ckpts[by_ref[src.model]].model_type}) "
                    "names its decoder layers in a way mlxmerge cannot slice (no layers.N, h.N or "
                    "blocks.N tensors)"
                )
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) > 1:
            raise RecipeError(
                f"slices[{i}]: every source must span the same number of layers, got {sorted(lengths)}"
            )
        if uses_base and base not in [s.model for s in sl.sources]:
            raise RecipeError(
                f"slices[{i}]: the base model {base} must be one of the slice's sources"
            )
        merged = [s for s in sl.sources if not (uses_base and s.model == base)]
        if len(merged) < spec.min_models or (spec.max_models and len(merged) > spec.max_models):
            want = spec.min_models if spec.min_models == spec.max_models else f"{spec.min_models}+"
            raise RecipeError(
                f"{method} merges {want} model(s) besides the base, got {len(merged)} in slices[{i}]"
            )

    _check_same_tensors(recipe, ckpts, by_ref)
    vocab = None
    if recipe.tokenizer is not None:
        from mlxmerge.merge.vocab import build_vocabulary

        vocab = build_vocabulary(recipe.tokenizer, base, models, ckpts)
    tensors: list[PlannedTensor] = []
    first, last = recipe.slices[0], recipe.slices[-1]

    def plan_one(out_name: str, in_names: dict[str, str], sl: Slice, t: float):
        srcs = [s for s in sl.sources if not (uses_base and s.model == base)]
        inputs = [(by_ref[s.model], in_names[s.model]) for s in srcs]
        base_in = (by_ref[base], in_names[base]) if uses_base else None
        gparams = {}
        for p, default in spec.global_params.items():
            v = resolve_parameter(p, out_name, t, source=None, slice_=sl, recipe=recipe)
            if v is None and default is REQUIRED:
                raise RecipeError(
                    f"{method}: parameter {p!r} is required (tensor {out_name}); set it in the "
                    f"recipe's parameters or with --{p.replace('_', '-')}"
                )
            gparams[p] = default if v is None else v
        tparams = {}
        for p, default in spec.tensor_params.items():
            values = []
            for s in srcs:
                v = resolve_parameter(p, out_name, t, source=s, slice_=sl, recipe=recipe)
                if v is None and default is REQUIRED:
                    raise RecipeError(
                        f"{method}: parameter {p!r} is required for {s.model} (tensor {out_name}); "
                        f"set it in the recipe's parameters or with --{p.replace('_', '-')}"
                    )
                values.append(default if v is None else v)
            tparams[p] = values
        on_vocab = vocab is not None and is_embedding(out_name)
        if on_vocab:
            shape = _vocab_shape(out_name, inputs, base_in, ckpts, vocab.size)
        else:
            shape = _output_shape(out_name, inputs, base_in, ckpts, models, spec, warnings)
        tensors.append(
            PlannedTensor(
                out_name,
                shape,
                inputs,
                base_in,
                t,
                gparams,
                tparams,
                is_embedding(out_name),
                vocab if on_vocab else None,
            )
        )

    def outside_names(sl: Slice, pre: bool) -> list[str]:
        names: dict[str, None] = {}
        for s in sl.sources:
            for n in ckpts[by_ref[s.model]].names():
                if (
                    layer_index(n) is None
                    and is_input_embedding(n) == pre
                    and not n.endswith("lm_head.weight")
                ):
                    names[n] = None
        return list(names)

    def source_names(sl: Slice, name: str) -> dict[str, str] | None:
        got = {}
        for s in sl.sources:
            ck = ckpts[by_ref[s.model]]
            is_head = name.endswith("lm_head.weight")
            if name in ck and (not is_head or stores_head(ck, name)):
                got[s.model] = name
            elif is_head and (ck.tie_word_embeddings or name in ck):
                got[s.model] = name.replace("lm_head.weight", "model.embed_tokens.weight")
            else:
                return None
        return got

    for name in outside_names(first, pre=True):
        got = source_names(first, name)
        if got is None:
            raise RecipeError(f"tensor {name} is missing from some models of slices[0]")
        plan_one(name, got, first, 0.0)

    out_layer = 0
    layer_sources: list[tuple[dict, int, int]] = []  # per output layer: (config, layers, index)
    for i, sl in enumerate(recipe.slices):
        n_layers = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        lead = ckpts[by_ref[sl.sources[0].model]]
        for offset in range(n_layers):
            t = offset / (n_layers - 1) if n_layers > 1 else 1.0
            lead_layer = sl.sources[0].layer_range[0] + offset
            for name in (n for n in lead.names() if layer_index(n) == lead_layer):
                in_names = {}
                for s in sl.sources:
                    src_name = renumber_layer(name, s.layer_range[0] + offset)
                    if src_name not in ckpts[by_ref[s.model]]:
                        raise RecipeError(f"slices[{i}]: {s.model} has no tensor {src_name}")
                    in_names[s.model] = src_name
                plan_one(renumber_layer(name, out_layer), in_names, sl, t)
            layer_sources.append((lead.config, lead.num_layers, lead_layer))
            out_layer += 1

    post = outside_names(last, pre=False)
    lm_head = "lm_head.weight"
    if any(stores_head(ckpts[by_ref[s.model]], lm_head) for s in last.sources):
        post.append(lm_head)
    for name in post:
        got = source_names(last, name)
        if got is None:
            raise RecipeError(f"tensor {name} is missing from some models of the last slice")
        # mergekit's planner reads pre- and post-layer tensors with t=0: a gradient's first anchor.
        plan_one(name, got, last, 0.0)

    tensors.sort(key=lambda p: natural_key(p.name))
    seen: set[str] = set()
    for p in tensors:  # a naming scheme renumber_layer does not know would collide here
        if p.name in seen:
            raise RecipeError(
                f"output tensor {p.name} would be written twice; its layer naming is not one "
                "mlxmerge can renumber"
            )
        seen.add(p.name)
    donor = ckpts[by_ref[base]] if base else ckpts[0]
    _check_layer_kinds(tensors, donor, base or models[0])
    config, layer_warnings = sliced_layer_fields(donor.config, layer_sources)
    warnings += layer_warnings
    embed = next((p for p in tensors if p.name.endswith("embed_tokens.weight")), None)
    if embed is not None:
        config["vocab_size"] = embed.shape[0]
        if vocab is None:
            _check_tokenizer_rows(donor, embed)
    for w in warnings:
        log.warning(w)
    warnings = recipe.warnings + warnings  # the recipe's own were logged when it was read
    return MergePlan(recipe, spec, models, ckpts, tensors, out_layer, config, warnings, vocab=vocab)


def tokenizer_size(folder: Path) -> int | None:
    """1 + the largest token id in ``folder/tokenizer.json`` (added tokens included), if any."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    tok = json.loads(path.read_text(encoding="utf-8"))
    vocab = (tok.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t["id"] for t in tok.get("added_tokens") or []]
    return max(ids) + 1 if ids else None


def _check_tokenizer_rows(donor: Checkpoint, embed: PlannedTensor) -> None:
    # Cropping to the common vocabulary (as mergekit does) must not leave the copied tokenizer
    # with ids past the last row: their logits would be garbage (NaN in mlx-lm).
    n = tokenizer_size(donor.path)
    own = donor.shape(embed.name)[0] if embed.name in donor else None
    if n is not None and embed.shape[0] < n and own is not None and own >= n:
        raise RecipeError(
            f"{embed.name}: the merged vocabulary keeps {embed.shape[0]} rows but the tokenizer "
            f"copied from {donor.path} has {n} tokens; add tokenizer_source: union (or base) "
            "so rows are built for every token"
        )


def _vocab_shape(name, inputs, base_in, ckpts, rows: int) -> tuple[int, ...]:
    """An embedding re-indexed to the output tokenizer: ``rows`` by the models' common width."""
    shapes = {tuple(ckpts[i].shape(n)) for i, n in [*inputs] + ([base_in] if base_in else [])}
    widths = {s[1:] for s in shapes}
    if any(len(s) != 2 for s in shapes) or len(widths) != 1:
        raise RecipeError(
            f"tensor {name} has shapes {sorted(shapes)}; embeddings must share their width"
        )
    return (rows, *widths.pop())


def _output_shape(name, inputs, base_in, ckpts, models, spec, warnings) -> tuple[int, ...]:
    shapes = [ckpts[i].shape(n) for i, n in inputs]
    base_shape = ckpts[base_in[0]].shape(base_in[1]) if base_in else None
    every = shapes + ([base_shape] if base_shape else [])
    if all(s == every[0] for s in every):
        return every[0]
    if not is_embedding(name) or any(len(s) != 2 for s in every):
        detail = ", ".join(
            f"{tuple(ckpts[i].shape(n))} in {models[i]}"
            for i, n in ([*inputs] + ([base_in] if base_in else []))
        )
        raise RecipeError(
            f"tensor {name} has different shapes: {detail}; the models must share an architecture"
        )
    if spec.embed_rectify == "base" and base_shape:
        out = base_shape
    else:
        out = (min(s[0] for s in every), min(s[1] for s in every))
    rows = max(s[0] for s in every) - out[0]
    warnings.append(
        f"{name}: vocabulary sizes differ ({sorted({s[0] for s in every})}); "
        f"output keeps {out[0]} rows, {rows} rows of the larger vocab are dropped or filled from the base"
    )
    return tuple(out)


def plan_summary(plan: MergePlan, out_dtype: mx.Dtype) -> dict:
    """What --dry-run prints: tensors, layers, parameters per tensor group, memory, size."""
    groups: dict[str, list] = {}
    for p in plan.tensors:
        key = re.sub(r"\.\d+\.", ".N.", p.name)
        groups.setdefault(key, []).append(p)
    rows = []
    for key, ps in groups.items():
        params = {}
        for k in list(ps[0].global_params) + list(ps[0].tensor_params):
            vals = [p.global_params.get(k, p.tensor_params.get(k)) for p in ps]
            params[k] = vals[0] if all(v == vals[0] for v in vals) else vals
        rows.append(
            {"tensors": key, "count": len(ps), "shape": list(ps[0].shape), "parameters": params}
        )
    largest = max(math.prod(p.shape) for p in plan.tensors) * 4
    return {
        "method": plan.recipe.merge_method,
        "models": plan.models,
        "base_model": plan.recipe.base_model,
        "output_tensors": len(plan.tensors),
        "output_layers": plan.num_layers,
        "groups": rows,
        "largest_tensor_fp32_bytes": largest,
        "estimated_peak_bytes": estimate_peak(plan, out_dtype),
        "available_memory_bytes": available_memory(),
        "output_bytes": sum(math.prod(p.shape) for p in plan.tensors) * out_dtype.size,
        "warnings": plan.warnings,
    }


# Peak resident memory of a merge, fitted to the peak RSS (VmHWM of a fresh process) of merges
# of synthetic bf16 Llama-shaped models at two sizes, largest fp32 tensor 65 MB (the estimate
# test's models) and 262 MB (benchmarks/bench_merge.py, 1.7 GB per model), 2026-11-30: bytes
# above the process's resident size before the merge ≈ slope × largest fp32 tensor + constant
# (MB), two merged models (plus the base where the method takes one). Every method's blocked
# form keeps its inputs in the stored dtype with float32 temporaries of a row block: slopes of
# 1-3. A plain passthrough (file copies) needs far less than its fit.
PEAK_FIT = {
    "linear": (1.3, 0), "passthrough": (0.8, 0), "slerp": (1.1, 100), "nuslerp": (1.1, 70),
    "nearswap": (1.0, 110), "multislerp": (1.1, 70), "karcher": (1.1, 70),
    "task_arithmetic": (2.1, 105), "ties": (2.2, 180), "dare_ties": (2.8, 95),
    "dare_linear": (2.8, 80), "breadcrumbs": (2.2, 155), "breadcrumbs_ties": (2.2, 165),
    "della": (2.7, 105), "della_linear": (2.8, 90), "sce": (2.4, 50), "model_stock": (1.7, 25),
    "ram": (1.9, 0), "ramplus_tl": (1.9, 10), "arcee_fusion": (2.0, 110),
}  # fmt: skip
UNBLOCKED_FIT = (6.0, 130)  # TIES/DARE when the tensor is too small (or a setting) for blocks
# Methods with a row-block form, fitted without it (a setting or a shape it does not take).
UNBLOCKED_PEAK_FIT = {
    "task_arithmetic": UNBLOCKED_FIT, "ties": UNBLOCKED_FIT, "dare_ties": UNBLOCKED_FIT,
    "dare_linear": UNBLOCKED_FIT, "breadcrumbs": (8.0, 70), "breadcrumbs_ties": (8.0, 70),
    "della": (6.8, 70), "della_linear": (6.8, 70), "sce": (7.8, 70),
}  # fmt: skip
OVERLAP_BUDGET = 128 * 1024**2  # prefetch and write-behind hold at most this much each
N_MODELS_FITTED = 2


def estimate_peak(plan: MergePlan, out_dtype: mx.Dtype, *, overlap: bool = True) -> int:
    """Estimated peak resident bytes of running ``plan`` in this process.

    The process's resident size now, plus per-method working memory (a multiple of the
    largest tensor in float32, see ``PEAK_FIT``; one more copy per merged model beyond two),
    plus what the reader and writer threads hold ahead (at most ``OVERLAP_BUDGET`` each).
    """

    method = plan.recipe.merge_method
    biggest = max(plan.tensors, key=lambda p: math.prod(p.shape))
    largest = math.prod(biggest.shape) * 4
    slope, constant = PEAK_FIT.get(method, UNBLOCKED_FIT)
    params = {**biggest.global_params, **biggest.tensor_params}
    if method in UNBLOCKED_PEAK_FIT and not _blocks(plan, params, biggest.shape):
        slope, constant = UNBLOCKED_PEAK_FIT[method]
    slope += max(0, max(len(p.inputs) for p in plan.tensors) - N_MODELS_FITTED)
    extra = 0
    if overlap:

        def in_bytes(p):
            return sum(plan.checkpoints[i].entries[n].nbytes
                       for i, n in p.inputs + ([p.base] if p.base else [])
                       if n in plan.checkpoints[i].entries)  # fmt: skip

        ahead = [b for b in map(in_bytes, plan.tensors) if b <= OVERLAP_BUDGET]
        behind = [b for p in plan.tensors
                  if (b := math.prod(p.shape) * out_dtype.size) <= OVERLAP_BUDGET]  # fmt: skip
        # inputs read ahead (+ a third: the NumPy-to-MLX copy of one), one output behind
        extra = int(1.3 * max(ahead, default=0)) + max(behind, default=0)
    return int(process_rss() + constant * 1000**2 + slope * largest + extra)


def _blocks(plan: MergePlan, params: dict, shape: tuple[int, ...]) -> bool:
    """Whether the method's row-block form takes a tensor of ``shape`` with ``params``."""
    from mlxmerge.merge.methods import row_blocks

    if plan.recipe.merge_method == "sce":
        return len(shape) >= 2 and math.prod(shape) >= row_blocks.MIN_ENTRIES
    return row_blocks.supported(plan.method.fn, params, shape)


def process_rss() -> int:
    """Resident bytes of this process now (Linux); its peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB else


def available_memory() -> int | None:
    """Bytes the system can give this process without swapping (None when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
