"""Stream a planned merge: one output tensor at a time, computed in float32, cast once, written."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import yaml

from mlxmerge._malloc import reuse_freed_memory
from mlxmerge.errors import OutputError, RecipeError
from mlxmerge.io import ModelCard, Quantization, human_bytes, parse_size, write_model
from mlxmerge.io.chat_template import resolve_template
from mlxmerge.io.dtypes import parse_float_dtype
from mlxmerge.io.finite import FiniteGuard
from mlxmerge.io.hub import is_hub_reference
from mlxmerge.io.model_folder import card_names, output_size, source_name
from mlxmerge.io.output import check_output, disk_free
from mlxmerge.io.writer import RawTensor
from mlxmerge.lora.fused import split_reference
from mlxmerge.merge.methods.common import ConsumableInputs
from mlxmerge.merge.plan import (
    MergePlan,
    available_memory,
    estimate_peak,
    is_stacked_experts,
    plan_merge,
    plan_summary,
)
from mlxmerge.merge.prefetch import InputPrefetcher, StoredTensor
from mlxmerge.merge.recipe import Recipe, recipe_yaml
from mlxmerge.merge.registry import derive_key

__all__ = ["compute_tensor", "load_inputs", "merge", "plan_merge", "plan_summary", "prepare"]

log = logging.getLogger(__name__)

QUANT_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode accepts
QUANT_GROUP_SIZES = (32, 64, 128)
TASK_VECTOR_WARN_RATIO = 0.5  # |x - base| / |base| above this suggests a different base model


def _fit_rows(x: mx.array, shape: tuple[int, ...], fill: mx.array | None) -> mx.array:
    """Crop (or pad from ``fill``, else zeros) a 2-D embedding to ``shape``."""
    x = x[: shape[0], : shape[1]]
    if x.shape[0] < shape[0]:
        pad = (
            fill[x.shape[0] : shape[0]]
            if fill is not None
            else mx.zeros((shape[0] - x.shape[0], shape[1]))
        )
        x = mx.concatenate([x, pad], axis=0)
    return x


def prepare(plan: MergePlan) -> None:
    """Whole-model statistics some options need before the first tensor (TIES model-wide trim)."""
    scopes = {p.global_params.get("trim_scope", "tensor") for p in plan.tensors}
    if "model" not in scopes:
        return
    if scopes != {"model"}:
        raise RecipeError(
            "trim_scope must be the same for every tensor (it is one model-wide threshold)"
        )
    from mlxmerge.merge.global_trim import model_thresholds

    first = next(p for p in plan.tensors if p.inputs)
    densities = first.tensor_params["density"]
    if any(p.tensor_params.get("density") != densities for p in plan.tensors if p.inputs):
        raise RecipeError("trim_scope: model needs one density per model (no gradients or filters)")
    plan.trim_thresholds = model_thresholds(plan, densities)
    log.info("model-wide TIES thresholds: %s", plan.trim_thresholds)


def load_inputs(
    plan: MergePlan,
    name: str,
    guard: FiniteGuard | None = None,
    stored: list[StoredTensor | None] | None = None,
) -> tuple[list[mx.array], mx.array | None]:
    """The merged inputs and the base of one output tensor, evaluated in their stored dtype.

    Each input's NaN/Inf check (a bit test of the loaded buffer, ``io.finite.all_finite``) runs
    as it is loaded, or ran on the stored bits in the prefetch thread (``stored``), so a
    non-finite input stops the merge before any computation (``guard.allow`` warns instead).
    """
    guard = guard or FiniteGuard()
    refs = input_refs(plan, name)
    stored = stored or [None] * len(refs)
    arrays = [
        plan.checkpoints[i].get(n) if st is None else st.to_mlx()
        for (i, n), st in zip(refs, stored)
    ]
    mx.eval(*arrays)
    for (i, n), a, st in zip(refs, arrays, stored):
        guard.check_input(plan.models[i], n, a, None if st is None else st.finite)
    return (arrays[:-1], arrays[-1]) if plan.tensor(name).base else (arrays, None)


def input_refs(plan: MergePlan, name: str) -> list[tuple[int, str]]:
    """(model index, tensor name) of every input of ``name``: the merged ones, then the base."""
    p = plan.tensor(name)
    return list(p.inputs) + ([p.base] if p.base else [])


def compute_tensor(
    plan: MergePlan,
    name: str,
    seed: int = 0,
    guard: FiniteGuard | None = None,
    inputs: tuple[list[mx.array], mx.array | None] | None = None,
    out_dtype: mx.Dtype | None = None,
) -> mx.array:
    """Merge one output tensor in float32 (lazy; the writer evaluates it).

    ``inputs`` are ``load_inputs``'s result when already loaded (prefetched); else they are
    loaded here. Raises ``NonFiniteError`` on a NaN/Inf input unless ``guard.allow``.
    With ``out_dtype``, a tensor whose inputs all have its shape goes through the method's
    memory-bounded form (``MethodSpec.blocked``: compiled kernels over the stored-dtype inputs,
    row blocks for large tensors) when it has one, and comes back evaluated in ``out_dtype``.
    """
    p = plan.tensor(name)
    xs, base = inputs if inputs is not None else load_inputs(plan, name, guard)
    inputs = None  # the lists hold the only references: methods may release them
    if p.vocab is not None:  # rows re-indexed to the output tokenizer before the method runs
        from mlxmerge.merge.vocab import permute_rows

        xs = [x.astype(mx.float32) for x in xs]
        base = None if base is None else base.astype(mx.float32)
        refs = [plan.models[i] for i, _ in p.inputs] + ([plan.models[p.base[0]]] if p.base else [])
        got = permute_rows(p.vocab, dict(zip(refs, xs + ([base] if p.base else []))))
        xs = [got[r] for r in refs[: len(xs)]]
        base = got[refs[-1]] if p.base else None
        got = None
    kwargs = {
        ("lambda_" if k == "lambda" else k): v
        for k, v in {**p.global_params, **p.tensor_params}.items()
    }
    if plan.trim_thresholds is not None:
        kwargs["trim_thresholds"] = plan.trim_thresholds
    fn = plan.method.fn

    def keys(tag):
        return (
            # by position: a model listed twice gets two independent masks
            {"keys": [derive_key(seed, tag, j) for j in range(len(p.inputs))]}
            if plan.method.random
            else {}
        )

    stacked = is_stacked_experts(name, p.shape)
    same = all(tuple(x.shape) == p.shape for x in [*xs] + ([base] if p.base else []))
    # the blocked forms mask by products (0·Inf = NaN): inputs let through with NaN/Inf
    # (--allow-nonfinite) take the plain functions, whose selects drop them
    finite = guard is None or not any(
        (plan.models[i], n) in guard.nonfinite for i, n in input_refs(plan, name)
    )
    if (
        out_dtype is not None
        and same
        and finite
        and not stacked
        and plan.method.blocked is not None
    ):
        params = {**getattr(fn, "keywords", {}), **kwargs, **keys(name)}
        y = plan.method.blocked(xs, base, out_dtype, **params)
        if y is not None:
            return y
    xs = [x.astype(mx.float32) for x in xs]
    base = None if base is None else base.astype(mx.float32)
    if base is not None and tuple(base.shape) != p.shape:
        base = _fit_rows(base, p.shape, None)
    # The only reference to the inputs: a method may release each one once it is used.
    xs = ConsumableInputs(
        x if tuple(x.shape) == p.shape else _fit_rows(x, p.shape, base) for x in xs
    )

    def call(ts, b, tag):
        return fn(ts, b, **kwargs, **keys(tag))

    if stacked:
        # Per-expert statistics, matching mergekit on the HF (unstacked) layout.
        out = [
            call([x[e] for x in xs], None if base is None else base[e], f"{name}[{e}]")
            for e in range(p.shape[0])
        ]
        return mx.stack(out)
    return call(xs, base, name)


def _task_vector_check(plan: MergePlan, name: str, checked: set[str]) -> None:
    # Once, on the first layer matrix: enough to catch a different base, no extra I/O after.
    p = plan.tensor(name)
    if checked or p.base is None or len(p.shape) != 2 or p.is_embed:
        return
    checked.add(name)
    base = plan.checkpoints[p.base[0]].get(p.base[1], mx.float32)
    base_norm = mx.linalg.norm(base.reshape(-1)).item()
    for i, n in p.inputs:
        if base_norm == 0:
            continue
        x = plan.checkpoints[i].get(n, mx.float32)
        ratio = mx.linalg.norm((x - base).reshape(-1)).item() / base_norm
        if ratio > TASK_VECTOR_WARN_RATIO:
            msg = (f"{plan.models[i]}: task vector of {name} is {ratio:.0%} of the base's norm; "
                   f"is {plan.models[i]} really fine-tuned from {plan.recipe.base_model}?")  # fmt: skip
            plan.warnings.append(msg)
            log.warning(msg)


def check_machine(
    plan: MergePlan,
    out_dtype: mx.Dtype,
    output: str | Path,
    *,
    overlap: bool = True,
    quantize: Quantization | None = None,
) -> None:
    """Before any compute: warn when the estimated peak memory exceeds what is available,
    refuse (``OutputError``) when the output (quantized, if asked) cannot fit on the disk that
    will hold it."""
    need = estimate_peak(plan, out_dtype, overlap=overlap)
    have = available_memory()
    if have is not None and need > have:
        msg = (
            f"the merge needs about {human_bytes(need)} of memory at its peak but {human_bytes(have)} is "
            "available; it may swap or be killed (close other programs or free memory first)"
        )
        plan.warnings.append(msg)
        log.warning(msg)
    size = output_size([(p.name, p.shape) for p in plan.tensors], out_dtype, quantize)
    folder, free = disk_free(output)
    if size > free:
        raise OutputError(
            f"{output}: the merged model needs {human_bytes(size)} but the disk holding {folder} has "
            f"{human_bytes(free)} free"
        )


def replay_yaml(plan: MergePlan, seed: int, dtype: mx.Dtype) -> str:
    """The recipe as run, for ``mlxmerge_config.yml``: the output dtype written (an
    ``--out-dtype`` given on the command line included) and, for DARE/DELLA, the seed of their
    masks in a comment (mergekit recipes have no seed key), so that running the file again
    gives the same model."""
    raw = dict(plan.recipe.raw)
    name = str(dtype).removeprefix("mlx.core.")
    if (raw.get("out_dtype") or raw.get("dtype") or "bfloat16") != name:
        raw["out_dtype"] = name
    text = yaml.safe_dump(raw, sort_keys=False)
    if plan.method.random:
        text = (f"# masks drawn with seed {seed}: mlxmerge merge mlxmerge_config.yml OUT "
                f"--seed {seed}\n") + text  # fmt: skip
    return text


def model_card(plan: MergePlan, quantize: Quantization | None = None) -> ModelCard:
    spec = plan.method
    # Sources by hub id or folder name: a card is for upload, not for this machine's paths.
    names = "\n".join(f"* {source_name(m)}" for m in plan.models)
    base = (
        f"\n\nBase model: {source_name(plan.recipe.base_model)}" if plan.recipe.base_model else ""
    )
    shown = dataclasses.replace(plan.recipe, raw=card_names(plan.recipe.raw, set(plan.models)))
    body = (
        "This model was merged with mlxmerge.\n\n"
        f"## Merge method\n\n`{plan.recipe.merge_method}`: {spec.summary} ({spec.paper}){base}\n\n"
        f"## Models merged\n\n{names}\n\n## Recipe\n\n```yaml\n{recipe_yaml(shown)}```"
    )
    if quantize:
        body += (
            f"\n\n## Quantization\n\nWritten {quantize.bits}-bit (MLX affine quantization, "
            f"group size {quantize.group_size}) as each merged tensor was computed."
        )
    bases = [(split_reference(m) or (m,))[0] for m in plan.models]  # model+lora: the model
    hub_ids = [m for m in dict.fromkeys(bases) if is_hub_reference(m)]
    return ModelCard(f"{plan.recipe.merge_method} merge", body, hub_ids, ["mlxmerge", "merge"])


def merge(
    recipe: MergePlan | Recipe | str | Path | dict,
    output: str | Path,
    *,
    allow_crimes: bool = False,
    seed: int = 0,
    layout: str = "mlx",
    out_dtype: str | None = None,
    shard_size: str | int = "5GB",
    quantize_bits: int | None = None,
    group_size: int = 64,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    allow_nonfinite: bool = False,
    overlap: bool = True,
    gguf_type: str | None = None,
) -> Path:
    """Run a mergekit recipe (or an already checked plan) and write the merged model.

    A recipe file with several YAML documents is a mergekit-multi recipe (``merge.multi``).
    ``quantize_bits`` (2-8) writes the merge straight to MLX affine quantization (``mx.quantize``
    with ``group_size``), each tensor quantized as it is streamed out; needs ``layout="mlx"``.
    ``layout="gguf"`` writes one GGUF file of ``gguf_type`` (``io.gguf_write``), quantized from
    the float32 merge.

    Every input tensor is checked for NaN/Inf as it is loaded and every output tensor before it
    is written; either raises ``NonFiniteError`` naming model and tensor (and the method, for an
    output) before anything is renamed into place, unless ``allow_nonfinite`` (then a warning,
    also kept in ``plan.warnings``).

    ``overlap`` reads the next tensor's inputs and writes the last output in background
    threads while the current tensor is computed (same bytes out as without).
    """
    from mlxmerge.merge.multi import is_multi_document, merge_multi

    if is_multi_document(recipe):
        return merge_multi(recipe, output, allow_crimes=allow_crimes, seed=seed, layout=layout,
                           out_dtype=out_dtype, shard_size=shard_size, force=force,
                           quantize_bits=quantize_bits, group_size=group_size,
                           progress=progress, allow_nonfinite=allow_nonfinite,
                           overlap=overlap, gguf_type=gguf_type)  # fmt: skip
    plan = (
        recipe if isinstance(recipe, MergePlan) else plan_merge(recipe, allow_crimes=allow_crimes)
    )
    recipe = plan.recipe
    quant = Quantization(bits=quantize_bits, group_size=group_size) if quantize_bits else None
    if quant and (quant.bits not in QUANT_BITS or group_size not in QUANT_GROUP_SIZES):
        raise RecipeError(
            f"cannot quantize to {quant.bits} bits with group size {group_size}; MLX supports "
            f"bits {QUANT_BITS} and group sizes {QUANT_GROUP_SIZES}"
        )
    if quant and layout != "mlx":
        why = (
            "for a quantized GGUF give --gguf-type q8_0, q4_k_m, ... instead of --quantize"
            if layout == "gguf"
            else "transformers cannot read MLX quantization"
        )
        raise RecipeError(f"quantized output needs --format mlx ({why})")
    # model+lora references: neither the model nor the adapter folder may be overwritten.
    inputs = [part for m in plan.models for part in (split_reference(m) or (m,))]
    check_output(output, inputs, force=force)  # before any long pre-pass
    dtype = parse_float_dtype(out_dtype or recipe.out_dtype or recipe.dtype or "bfloat16")
    if layout == "gguf":  # --gguf-type sets the stored precision: quantize from the fp32 merge
        dtype = mx.float32
    check_machine(plan, dtype, output, overlap=overlap, quantize=quant)
    prepare(plan)
    donor = plan.checkpoints[plan.models.index(recipe.base_model or plan.models[0])].path
    chat_template = resolve_template(recipe.chat_template, [c.path for c in plan.checkpoints])
    with tempfile.TemporaryDirectory() as built:
        if plan.vocab is not None:  # the tokenizer built for the output vocabulary
            plan.vocab.save(Path(built))
            donor = Path(built)
        return _write(plan, output, seed, donor, chat_template, dtype, layout, shard_size,
                      force, progress, quant, inputs, allow_nonfinite, overlap,
                      gguf_type)  # fmt: skip


def _write(plan, output, seed, tokenizer_dir, chat_template, dtype, layout, shard_size, force,
           progress, quant, inputs, allow_nonfinite, overlap, gguf_type=None) -> Path:  # fmt: skip
    recipe = plan.recipe
    checked: set[str] = set()
    guard = FiniteGuard(allow_nonfinite, f"{recipe.merge_method} merge", plan.warnings)

    def raw_copy(name: str) -> RawTensor | None:
        p = plan.tensor(name)
        if (
            recipe.merge_method == "passthrough"
            and p.tensor_params.get("scale") == [1.0]
            and p.vocab is None  # permuted rows are not the stored bytes
        ):
            i, src = p.inputs[0]
            if plan.checkpoints[i].shape(src) == p.shape:
                return plan.checkpoints[i].raw(src)
        return None

    computed = [p.name for p in plan.tensors if raw_copy(p.name) is None]
    # Overlap: the next tensor's inputs are read (and NaN/Inf-tested) by a reader thread while
    # this one is computed; the writer thread writes the last one (write-behind).
    reader = (
        InputPrefetcher(
            ((n, [(plan.checkpoints[i], src) for i, src in input_refs(plan, n)]) for n in computed),
            depth=1,
        )
        if overlap
        else None
    )

    def compute(name: str) -> mx.array | RawTensor:
        raw = raw_copy(name)
        if raw is not None:
            return raw
        _task_vector_check(plan, name, checked)
        stored = reader.get(name) if reader is not None else None
        return compute_tensor(
            plan, name, seed, guard, load_inputs(plan, name, guard, stored), out_dtype=dtype
        )

    try:
        with reuse_freed_memory():  # each tensor's buffers reused by the next, not faulted anew
            return write_model(
                output, [(p.name, p.shape) for p in plan.tensors], compute, config=plan.config,
                tokenizer_source=tokenizer_dir, card=model_card(plan, quant), dtype=dtype,
                layout=layout, quantize=quant, shard_size=parse_size(shard_size),
                num_layers=plan.num_layers,
                chat_template=chat_template,
                extra_files={"mlxmerge_config.yml": replay_yaml(plan, seed, dtype)},
                inputs=inputs, force=force, progress=progress, guard=guard, background=overlap,
                gguf_type=gguf_type,
            )  # fmt: skip
    finally:
        if reader is not None:
            reader.close()
        mx.clear_cache()  # the buffers MLX kept for the next tensor: a caller's memory back
