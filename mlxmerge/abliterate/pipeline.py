"""``abliterate``: find the refusal direction, orthogonalize the residual writers, export, measure."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmerge.abliterate import directions as D
from mlxmerge.abliterate.architectures import architecture, embedding_tensor, writer_tensors
from mlxmerge.abliterate.hooks import Instrumented
from mlxmerge.abliterate.orthogonalize import (
    orthogonalize_bias,
    orthogonalize_embedding,
    orthogonalize_weight,
    post_norm_direction,
    write_component,
)  # fmt: skip
from mlxmerge.abliterate.prompts import prompt_set
from mlxmerge.abliterate.report import card_markdown, public_report, rewrite_report
from mlxmerge.errors import MlxmergeError
from mlxmerge.eval.refusal import REFUSAL_MARKERS, is_refusal
from mlxmerge.io import ModelCard, Quantization, open_checkpoint, write_model
from mlxmerge.io.finite import FiniteGuard
from mlxmerge.io.hub import is_hub_reference
from mlxmerge.io.model_folder import source_name
from mlxmerge.io.output import check_output
from mlxmerge.lm.chat import (
    chat_tokens,
    check_chat_template,
    eos_token_ids,
    pad_token_id,
    post_instruction_tokens,
)  # fmt: skip
from mlxmerge.lm.generate import generate_tokens, last_logits

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, advance, total)


def parse_layers(spec: str | None, num_layers: int, option: str = "--layers") -> list[int]:
    """``auto``/None → all layers; else ``12-18``, ``3`` or ``1,3,5-7`` (inclusive), checked."""
    if spec is None or str(spec).strip() == "auto":
        return list(range(num_layers))
    out: list[int] = []
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise MlxmergeError(f"{option} {spec}: use auto, N, A-B or a comma list of these")
        a, b = int(m[1]), int(m[2] or m[1])
        if a > b:
            raise MlxmergeError(f"{option} {spec}: range {a}-{b} runs backwards")
        out.extend(range(a, b + 1))
    bad = [i for i in out if i >= num_layers]
    if bad:
        raise MlxmergeError(
            f"{option} {spec}: layer {max(bad)} is out of range; the model has {num_layers} "
            f"layers (0-{num_layers - 1})"
        )
    return sorted(set(out))


def _direction_layer(spec, num_layers: int) -> int | None:
    if spec is None or str(spec) == "auto":
        return None
    try:
        n = int(spec)
    except ValueError:
        raise MlxmergeError(f"--direction-layer {spec}: use auto or a layer number") from None
    if not 0 <= n <= num_layers:
        raise MlxmergeError(
            f"--direction-layer {n} is out of range; residual points run 0-{num_layers} "
            f"(layer inputs 0-{num_layers - 1}, {num_layers} = output of the last layer)"
        )
    return n


def _tick(progress: Progress | None, stage: str, total: int):
    if progress is None:
        return None
    progress(stage, 0, total)
    return lambda n: progress(stage, n, total)


def answer_texts(model, tokenizer, token_lists, *, max_tokens, batch_size, progress=None, stage=""):
    ids = generate_tokens(
        model, token_lists, eos_ids=eos_token_ids(tokenizer), max_tokens=max_tokens,
        pad_id=pad_token_id(tokenizer), batch_size=batch_size,
        progress=_tick(progress, stage, len(token_lists)),
    )  # fmt: skip
    return [tokenizer.decode(t) for t in ids]


def refusal_first_tokens(tokenizer, token_lists, answers, markers) -> list[int]:
    """First answer tokens of the refused prompts that start at least 10% of refusals."""
    firsts = {}
    for prompt, text in zip(token_lists, answers):
        if is_refusal(text, markers) and text.strip():
            t = tokenizer.encode(text, add_special_tokens=False)[0]
            firsts[t] = firsts.get(t, 0) + 1
    total = sum(firsts.values())
    return sorted(t for t, c in firsts.items() if c >= 0.1 * total)


def abliterate(
    model: str | Path,
    output: str | Path,
    *,
    harmful: str | Path | None = None,
    harmless: str | Path | None = None,
    column: str | None = None,
    layers: str = "auto",
    direction_layer: str | int = "auto",
    strength: float = 1.0,
    projected: bool = True,
    norm_preserving: bool = False,
    embeddings: bool = False,
    trials: int = 0,
    pick: int | None = None,
    seed: int = 0,
    system: str | None = None,
    template: str | None = None,
    batch_size: int = 16,
    n_val: int = 32,
    max_tokens: int = 100,
    markers: tuple[str, ...] = REFUSAL_MARKERS,
    kl_threshold: float = 0.1,
    allow_nonfinite: bool = False,
    dtype: str = "bfloat16",
    layout: str = "mlx",
    quantize: Quantization | None = None,
    gguf_type: str | None = None,
    adapter: bool = False,
    evaluate: bool = True,
    force: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Remove the refusal direction from ``model`` and write the result to ``output``.

    Returns the report (also saved as ``abliteration.json`` beside the weights).
    """
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model)
    arch = architecture(ckpt.model_type)
    n_layers = ckpt.num_layers
    edit_layers = parse_layers(layers, n_layers)
    fixed_point = _direction_layer(direction_layer, n_layers)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise MlxmergeError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    if adapter and (quantize or embeddings or norm_preserving):
        raise MlxmergeError(
            "--adapter keeps the base weights as they are; it cannot be combined with "
            "--quantize, --embeddings or --norm-preserving"
        )
    if adapter and getattr(ckpt, "adapter", None) is not None:
        raise MlxmergeError(
            f"{model}: --adapter writes an adapter for a plain base; merge the LoRA first "
            "(mlxmerge linear MODEL+ADAPTER --weight 1 -o OUT) or abliterate to a full model"
        )
    if adapter:
        from mlxmerge.abliterate.adapter import check_adapter_export

        check_adapter_export(ckpt)
    if pick is not None and not trials:
        raise MlxmergeError("--pick chooses among search trials; give --trials N as well")
    if trials < 0:
        raise MlxmergeError(f"--trials must be 0 or more (got {trials})")
    if strength <= 0:
        raise MlxmergeError(f"--strength must be positive (got {strength})")
    writers = writer_tensors(ckpt.names(), arch)
    if not writers:
        raise MlxmergeError(f"{model}: found no residual writers for model_type {ckpt.model_type}")
    check_output(output, [model], force=force)
    harm = prompt_set("harmful", harmful, column=column, seed=seed)
    good = prompt_set("harmless", harmless, column=column, seed=seed)
    for name, ps in (("harmful", harm), ("harmless", good)):
        if len(ps.train) < batch_size:
            raise MlxmergeError(
                f"{name} prompts ({ps.source}): {len(ps.train)} training prompts, fewer than the "
                f"batch size {batch_size}; give more prompts or a smaller --batch-size"
            )
        if not ps.val or not ps.test:
            raise MlxmergeError(f"{name} prompts ({ps.source}): too few to split train/val/test")

    from mlxmerge.lm.load import load

    net, tokenizer = load(ckpt, verb="abliterate")  # base+adapter: the adapter applied
    check_chat_template(tokenizer, template)
    pad = pad_token_id(tokenizer)
    toks = {
        (kind, split): chat_tokens(
            tokenizer, getattr(ps, split), system=system, chat_template=template
        )
        for kind, ps in (("harmful", harm), ("harmless", good))
        for split in ("train", "val", "test")
    }
    n_pos = len(post_instruction_tokens(tokenizer, system=system, chat_template=template)) or 1
    inst = Instrumented(net, arch)
    report: dict = {
        "model": str(model), "output": str(output), "model_type": ckpt.model_type,
        "num_layers": n_layers, "prompts": {"harmful": harm.source, "harmless": good.source},
        "strength": strength, "projected": projected, "norm_preserving": norm_preserving,
        "embeddings": embeddings, "edited_layers": edit_layers, "seed": seed,
        "tied_embeddings": ckpt.tie_word_embeddings, "adapter": adapter,
    }  # fmt: skip
    timings = {}
    with inst.installed():
        # 1. Means of the residual stream on the training prompts.
        t = time.perf_counter()
        means = {}
        for kind in ("harmful", "harmless"):
            tl = toks[(kind, "train")]
            means[kind] = D.mean_residuals(
                inst, tl, n_pos, pad_id=pad, batch_size=batch_size,
                progress=_tick(progress, f"residuals ({kind})", len(tl)),
            )  # fmt: skip
        diffs = D.difference_of_means(means["harmful"], means["harmless"], projected=projected)
        timings["directions_s"] = time.perf_counter() - t
        timings["directions_prompts_per_s"] = (
            len(toks[("harmful", "train")]) + len(toks[("harmless", "train")])
        ) / timings["directions_s"]

        # 2. Which first tokens mean "refusal" for this model, from its own answers.
        harmful_val, harmless_val = (
            toks[("harmful", "val")][:n_val],
            toks[("harmless", "val")][:n_val],
        )
        val_answers = answer_texts(
            net, tokenizer, harmful_val, max_tokens=min(max_tokens, 32), batch_size=batch_size,
            progress=progress, stage="base answers",
        )  # fmt: skip
        refusal_ids = refusal_first_tokens(tokenizer, harmful_val, val_answers, markers)
        base_val_refusal = sum(is_refusal(a, markers) for a in val_answers) / len(val_answers)
        if not refusal_ids and fixed_point is None:
            raise MlxmergeError(
                f"{model} refuses none of the {len(harmful_val)} harmful validation prompts by "
                "the refusal markers. If it does refuse in words the markers miss (another "
                "language or phrasing), pass --markers FILE with its own refusal openings "
                "(one per line), or give the direction's layer explicitly with --direction-layer"
            )
        if not refusal_ids:
            # The user chose the direction: edit anyway; refusal scores are then uninformative.
            log.warning(
                "%s refuses none of the %d harmful validation prompts (by the refusal markers); "
                "--direction-layer %d given, so the difference-of-means direction there is "
                "removed anyway", model, len(harmful_val), fixed_point,
            )  # fmt: skip
        report["refusal_tokens"] = [tokenizer.decode([i]) for i in refusal_ids]

        # 3. Candidates scored by measurement.
        t = time.perf_counter()
        limit = int(0.8 * n_layers)
        cand_layers = [fixed_point] if fixed_point is not None else list(range(1, max(limit, 2)))
        candidates = D.score_candidates(
            inst, diffs, harmful_val, harmless_val, refusal_ids, edit_layers=edit_layers,
            strength=strength, candidate_layers=cand_layers, pad_id=pad, batch_size=batch_size,
            progress=_tick(progress, "candidates", len(cand_layers) * n_pos),
        )  # fmt: skip
        if fixed_point is not None:
            best, why = D.select_candidate(candidates, n_layers, kl_threshold=kl_threshold,
                                           prune_fraction=0.0)  # fmt: skip
            why = f"--direction-layer {fixed_point} given; best position there: {why}"
        else:
            best, why = D.select_candidate(candidates, n_layers, kl_threshold=kl_threshold)
        timings["selection_s"] = time.perf_counter() - t
        r = D.unit_np(diffs[best.layer, best.position]).astype(np.float32)
        direction = {"layer": best.layer, "position": best.position, "why": why,
                     "raw_norm": float(np.linalg.norm(diffs[best.layer, best.position]))}  # fmt: skip
        report["direction"] = direction
        report["candidates"] = [asdict(c) for c in candidates]
        report["separation"] = D.separation(means["harmful"], means["harmless"], best.position)
        report["base_val_refusal_rate"] = base_val_refusal
        attn_w = [strength if i in edit_layers else 0.0 for i in range(n_layers)]
        mlp_w = list(attn_w)
        layer_dirs = None  # one direction for every layer

        # 4. Optional heretic-style search over per-layer kernels.
        if trials:
            from mlxmerge.abliterate.search import search

            t = time.perf_counter()
            found = search(
                inst, tokenizer, diffs, harmful_val, harmless_val, position=best.position,
                trials=trials, seed=seed, pick=pick, kl_threshold=kl_threshold, edit_layers=edit_layers, pad_id=pad, batch_size=batch_size,
                max_tokens=min(max_tokens, 32), markers=markers,
                progress=_tick(progress, "trials", trials),
            )  # fmt: skip
            timings["search_s"] = time.perf_counter() - t
            report["search"] = found["report"]
            attn_w, mlp_w, layer_dirs = found["attn"], found["mlp"], found["directions"]
            r = found["global_direction"] if layer_dirs is None else r
        report["attn_weights"], report["mlp_weights"] = attn_w, mlp_w
    report["direction"]["vector"] = r.tolist()

    # 5. Export: every residual writer edited in float32, streamed through the writer.
    t = time.perf_counter()
    report["timings"] = timings
    card_body = card_markdown(report)
    extra = {"abliteration.json": json.dumps(public_report(report), indent=2)}
    if adapter:
        from mlxmerge.abliterate.adapter import export_adapter

        extra["README.md"] = f"# Abliteration adapter for {source_name(model)}\n\n{card_body}\n"
        export_adapter(ckpt, output, r if layer_dirs is None else layer_dirs,
                       attn_weights=attn_w, mlp_weights=mlp_w, force=force, extra_files=extra)  # fmt: skip
        residual = None
    else:
        residual = orthogonalize_model(
            ckpt, output, r if layer_dirs is None else layer_dirs, attn_weights=attn_w,
            mlp_weights=mlp_w, embedding_strength=strength if embeddings else 0.0,
            norm_preserving=norm_preserving, dtype=dtype, layout=layout, quantize=quantize,
            chat_template=template, force=force, card_body=card_body, extra_files=extra,
            progress=progress, allow_nonfinite=allow_nonfinite, gguf_type=gguf_type,
        )  # fmt: skip
    timings["write_s"] = time.perf_counter() - t
    if residual is not None:
        report["quantization_residual"] = residual

    # 6. Before/after on held-out test prompts, the "after" from the saved model.
    if evaluate:
        t = time.perf_counter()
        base_path = str(ckpt.path) if adapter else None
        report.update(_before_after(net, tokenizer, output, toks, max_tokens=max_tokens, base_path=base_path,
                                    batch_size=batch_size, markers=markers, progress=progress))  # fmt: skip
        timings["evaluate_s"] = time.perf_counter() - t
    from mlxmerge.abliterate.report import plot_report

    plot = plot_report(report, Path(output) / "abliteration.png")
    report["plot"] = str(plot) if plot else None
    timings["total_s"] = time.perf_counter() - t0
    rewrite_report(Path(output), report)
    return report


def orthogonalize_model(
    model, output: str | Path, direction, *, attn_weights: list[float] | None = None,
    mlp_weights: list[float] | None = None, strength: float = 1.0, layers: str = "auto",
    embedding_strength: float = 0.0, norm_preserving: bool = False, dtype: str = "bfloat16",
    layout: str = "mlx", quantize: Quantization | None = None, chat_template: str | None = None,
    force: bool = False, card_body: str = "", extra_files: dict[str, str] | None = None,
    progress: Progress | None = None, allow_nonfinite: bool = False, gguf_type: str | None = None,
) -> float | None:  # fmt: skip
    """Write ``model`` with ``direction`` removed from its residual writers, tensor by tensor.

    ``direction`` is one (d_model,) vector or one per layer (n_layers, d_model). Weights per
    layer and component default to ``strength`` on ``layers``. When re-quantizing, returns the
    mean of ‖rᵀ(Q(W') − W')‖ / ‖rᵀ(W − W')‖ over the edited weights: the re-quantization noise
    along r relative to the edit (0 = exact, 1 = as large as the edit); else None.
    """
    ckpt = model if hasattr(model, "entries") else open_checkpoint(model)
    arch = architecture(ckpt.model_type)
    n_layers = ckpt.num_layers
    if attn_weights is None or mlp_weights is None:
        edit = parse_layers(layers, n_layers)
        attn_weights = [strength if i in edit else 0.0 for i in range(n_layers)]
        mlp_weights = list(attn_weights)
    directions = np.asarray(direction, dtype=np.float32)
    D.check_direction(directions)
    # Every weight read is checked for NaN/Inf with the output it makes (one reduction each).
    guard = FiniteGuard(allow_nonfinite, "abliterate")

    def get(name: str, dtype: mx.Dtype | None = None) -> mx.array:
        return guard.watch(str(ckpt.reference), name, ckpt.get(name, dtype))

    _, hidden = ckpt.config_field("hidden_size")  # GPT-2: n_embd
    if hidden is not None and directions.shape[-1] != int(hidden):
        raise MlxmergeError(
            f"direction has {directions.shape[-1]} dimensions but the model's hidden size is "
            f"{hidden}"
        )
    out_dtype = getattr(mx, dtype)
    names = ckpt.names()
    by_name = {w.name: w for w in writer_tensors(names, arch)}
    emb_name = embedding_tensor(names, arch) if embedding_strength else None
    quant_residual: list[float] = []
    global_r = mx.array(directions if directions.ndim == 1 else directions.mean(0))

    def direction_for(layer: int) -> mx.array:
        return global_r if directions.ndim == 1 else mx.array(directions[layer])

    def compute(name: str) -> mx.array:
        wt = by_name.get(name)
        if wt is not None:
            lam = attn_weights[wt.layer] if wt.writer.component == "attn" else mlp_weights[wt.layer]
            if lam == 0.0:
                return get(name)
            rr = direction_for(wt.layer)
            if wt.norm_weight:
                rr = post_norm_direction(rr, arch.gain_offset + get(wt.norm_weight, mx.float32))
            w = get(name, mx.float32)
            if name.endswith(".bias"):
                return orthogonalize_bias(w, rr, lam)
            out = orthogonalize_weight(w, rr, lam, norm_preserving=norm_preserving)
            if quantize is not None and out.shape[-1] % quantize.group_size == 0:
                edit = write_component(w - out, rr)  # the size of the edit along r
                q = mx.quantize(out.astype(out_dtype), group_size=quantize.group_size,
                                bits=quantize.bits, mode=quantize.mode)  # fmt: skip
                deq = mx.dequantize(*q, group_size=quantize.group_size, bits=quantize.bits,
                                    mode=quantize.mode)  # fmt: skip
                noise = write_component(deq - out, rr)  # what re-quantization put back along r
                quant_residual.append((noise / mx.maximum(edit, 1e-12)).item())
            return out
        if name == emb_name:
            return orthogonalize_embedding(get(name, mx.float32), global_r, embedding_strength,
                                           norm_preserving=norm_preserving)  # fmt: skip
        return get(name)

    plan = [(n, ckpt.shape(n)) for n in names]
    tick = _tick(progress, "writing", len(plan))
    card = ModelCard(
        f"{Path(str(ckpt.reference)).name} (abliterated)", body=card_body,
        base_models=[str(ckpt.reference)] if is_hub_reference(ckpt.reference) else [],
        tags=["mlxmerge", "abliterated"],
    )  # fmt: skip
    write_model(
        output, plan, compute, config=ckpt.config, tokenizer_source=ckpt.path, card=card,
        dtype=out_dtype, layout=layout, quantize=quantize, inputs=[ckpt], force=force,
        chat_template=chat_template, progress=(lambda _n: tick(1)) if tick else None,
        extra_files=extra_files, guard=guard, gguf_type=gguf_type,
    )  # fmt: skip
    if not quant_residual:
        return None
    frac = float(np.mean(quant_residual))
    if frac > 0.1:
        log.warning(
            "%d-bit requantization puts back along the refusal direction %.0f%% of what the "
            "edit removed; export unquantized (bfloat16) or at 8 bits to keep the edit",
            quantize.bits, 100 * frac,
        )  # fmt: skip
    return frac


def _before_after(base, tokenizer, output, toks, *, max_tokens, batch_size, markers, progress,
                  base_path=None):  # fmt: skip
    from mlxmerge.lm.load import load
    from mlxmerge.lm.logprobs import kl_divergence

    if base_path:  # an adapter: the base with the LoRA applied, as users will load it
        edited, _ = load(base_path, adapter_path=output, verb="abliterate")
    else:
        edited, _ = load(output, verb="abliterate")
    pad = pad_token_id(tokenizer)
    res = {}
    answers = {}
    for tag, net in (("before", base), ("after", edited)):
        harmful = answer_texts(net, tokenizer, toks[("harmful", "test")], max_tokens=max_tokens,
                               batch_size=batch_size, progress=progress, stage=f"{tag}: harmful")  # fmt: skip
        harmless = answer_texts(net, tokenizer, toks[("harmless", "test")], max_tokens=max_tokens,
                                batch_size=batch_size, progress=progress, stage=f"{tag}: harmless")  # fmt: skip
        answers[tag] = harmless
        res[tag] = {
            "refusal_rate": sum(is_refusal(a, markers) for a in harmful) / len(harmful),
            "harmless_refusal_rate": sum(is_refusal(a, markers) for a in harmless) / len(harmless),
            "harmful_examples": harmful[:3],
        }
    base_logits = last_logits(base, toks[("harmless", "test")], pad_id=pad, batch_size=batch_size)
    new_logits = last_logits(edited, toks[("harmless", "test")], pad_id=pad, batch_size=batch_size)
    res["after"]["kl"] = kl_divergence(base_logits, new_logits).mean().item()
    same = sum(a == b for a, b in zip(answers["before"], answers["after"]))
    res["after"]["same_harmless_answers"] = same / len(answers["before"])
    res["n_test"] = {"harmful": len(toks[("harmful", "test")]), "harmless": len(answers["before"])}
    return res


__all__ = ["abliterate", "orthogonalize_model", "parse_layers"]
