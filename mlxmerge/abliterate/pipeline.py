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
from mlxmerge.abliterate.report import _ranges, card_markdown, public_report, rewrite_report
from mlxmerge.errors import MlxmergeError
from mlxmerge.eval.refusal import REFUSAL_MARKERS, format_rate, is_refusal, rate_summary
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


def _direction_points(spec, num_layers: int) -> list[int] | None:
    """``--direction-layer``: None for auto, else the residual points (0..L) to search."""
    if spec is None or str(spec).strip() == "auto":
        return None
    text = str(spec).strip()
    if re.fullmatch(r"\d+", text):
        n = int(text)
        if not 0 <= n <= num_layers:
            raise MlxmergeError(
                f"--direction-layer {n} is out of range; residual points run 0-{num_layers} "
                f"(layer inputs 0-{num_layers - 1}, {num_layers} = output of the last layer)"
            )
        return [n]
    if not re.fullmatch(r"[\d\s,-]+", text):
        raise MlxmergeError(
            f"--direction-layer {spec}: use auto or a layer number (or a range A-B to search)"
        )
    return parse_layers(text, num_layers + 1, option="--direction-layer")


def parse_positions(spec: str | None, n_positions: int) -> list[int] | None:
    """``--positions``: None for all post-instruction positions, else negative indices (-1 = last)."""
    if spec is None or str(spec).strip() in ("auto", "all"):
        return None
    out = []
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(-\d+)\s*(?:\.\.\s*(-\d+)\s*)?", part)
        if not m:
            raise MlxmergeError(
                f"--positions {spec}: use auto or negative positions such as -1,-3 or -5..-1"
            )
        a, b = int(m[1]), int(m[2] or m[1])
        out.extend(range(min(a, b), max(a, b) + 1))
    bad = [p for p in out if not -n_positions <= p <= -1]
    if bad:
        raise MlxmergeError(
            f"--positions {spec}: position {bad[0]} is out of range; the chat template has "
            f"{n_positions} post-instruction tokens (-{n_positions}..-1)"
        )
    return sorted(set(out))


def _tick(progress: Progress | None, stage: str, total: int):
    if progress is None:
        return None
    progress(stage, 0, total)
    return lambda n: progress(stage, n, total)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def rank_screened(screened, kl_threshold: float) -> list[int]:
    """Indices of screened candidates, best first: estimated KL within the threshold first, then
    the lowest estimated refusal score (the order Arditi's filters and pick would use)."""
    return sorted(
        range(len(screened)),
        key=lambda i: (screened[i].kl > kl_threshold, screened[i].bypass, screened[i].kl),
    )


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
    positions: str = "auto",
    top_candidates: int = 8,
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
    notify: Callable[[str], None] | None = None,
) -> dict:
    """Remove the refusal direction from ``model`` and write the result to ``output``.

    The direction is searched among residual points ``direction_layer`` (auto: 1 to 80% of the
    layers; N fixes one; A-B narrows) × post-instruction ``positions`` (auto: all; e.g. "-1,-2"):
    all of them are ranked by a first-order estimate (``screening``), the best
    ``top_candidates`` are measured exactly (0: measure every candidate, Arditi's exhaustive
    sweep). ``notify`` receives one-line messages meant for the user before slow stages (the
    base model's refusal rate, the search plan and its estimated time). Returns the report
    (also saved as ``abliteration.json`` beside the weights).
    """
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model)
    arch = architecture(ckpt.model_type)
    n_layers = ckpt.num_layers
    edit_layers = parse_layers(layers, n_layers)
    points = _direction_points(direction_layer, n_layers)
    if top_candidates < 0:
        raise MlxmergeError(f"--top-candidates must be 0 (all) or more (got {top_candidates})")
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
    say = notify or (lambda msg: log.info("%s", msg))
    position_filter = parse_positions(positions, n_pos)
    harmful_val, harmless_val = toks[("harmful", "val")][:n_val], toks[("harmless", "val")][:n_val]
    with inst.installed():
        # 1. The base model's refusals on the validation prompts: seconds, before the slow work.
        t = time.perf_counter()
        val_answers = answer_texts(
            net, tokenizer, harmful_val, max_tokens=min(max_tokens, 32), batch_size=batch_size,
            progress=progress, stage="base answers",
        )  # fmt: skip
        verdicts = [is_refusal(a, markers) for a in val_answers]
        base_val = rate_summary(verdicts)
        refusal_ids = refusal_first_tokens(tokenizer, harmful_val, val_answers, markers)
        timings["base_answers_s"] = time.perf_counter() - t
        say(
            f"{Path(str(model)).name} refuses {format_rate(base_val)} of the harmful validation "
            f"prompts (greedy, {min(max_tokens, 32)} tokens, marker judge)"
        )
        if not refusal_ids and points is None:
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
                "--direction-layer %s given, so the difference-of-means direction there is "
                "removed anyway", model, len(harmful_val), direction_layer,
            )  # fmt: skip
        elif base_val["ci95"][1] < 0.25:
            say(
                "this model barely refuses: there is little refusal to remove, and the "
                "direction found may not carry it (check the answers: mlxmerge refusals MODEL "
                "--answers 10)"
            )
        report["refusal_tokens"] = [tokenizer.decode([i]) for i in refusal_ids]
        report["base_val_refusal"] = base_val
        report["base_val_refusal_rate"] = base_val["rate"]

        # 2. Means of the residual stream on the training prompts, up to the last point needed
        # (MLX is lazy: the layers above it and the LM head are never computed).
        limit = int(0.8 * n_layers)
        cand_layers = points if points is not None else list(range(1, max(limit, 2)))
        last_point = n_layers if trials else max(cand_layers)
        t = time.perf_counter()
        means = {}
        for kind in ("harmful", "harmless"):
            tl = toks[(kind, "train")]
            means[kind] = D.mean_residuals(
                inst, tl, n_pos, pad_id=pad, batch_size=batch_size, last_point=last_point,
                progress=_tick(progress, f"residuals ({kind})", len(tl)),
            )  # fmt: skip
        diffs = D.difference_of_means(means["harmful"], means["harmless"], projected=projected)
        timings["directions_s"] = time.perf_counter() - t
        n_train = len(toks[("harmful", "train")]) + len(toks[("harmless", "train")])
        timings["directions_prompts_per_s"] = n_train / timings["directions_s"]

        # 3. Candidates: all ranked by a first-order estimate, the best few measured exactly.
        cands = D.candidate_points(diffs, cand_layers, position_filter)
        if not cands:
            raise MlxmergeError(
                f"--direction-layer {direction_layer} --positions {positions}: no candidate "
                "with a harmful/harmless difference (template tokens at the embedding point "
                "are the same for both sets)"
            )
        screen = 0 < top_candidates < len(cands)
        n_measured = top_candidates if screen else len(cands)
        # Passes over n_val prompts: stage 1 is a forward + backward pass (~3 forward passes)
        # per set; stage 2 three forward passes per candidate, plus the base harmless logits.
        passes = (6 if screen else 0) + 3 * n_measured + 1
        # A scoring pass costs ~1.4 capture passes (LM head, per-batch evaluation; measured on
        # SmolLM2-135M: both stages took 449 s where the capture speed alone predicted 329 s).
        eta = 1.4 * passes * len(harmful_val) / timings["directions_prompts_per_s"]
        plan = (
            f"direction search: {len(cands)} candidates "
            f"(residual points {_ranges(sorted({c[0] for c in cands}))} × "
            f"{len({c[1] for c in cands})} positions); "
            + (
                f"ranking all from 2 gradient passes, then measuring the best {n_measured} "
                if screen
                else f"measuring all {n_measured} "
            )
            + f"(3 passes each): {passes} passes over {len(harmful_val)} prompts, "
            f"about {_duration(eta)}"
        )
        say(plan)
        report["search_plan"] = {"candidates": len(cands), "measured": n_measured,
                                 "passes": passes, "estimated_s": eta}  # fmt: skip
        t = time.perf_counter()
        lam_layers = edit_layers
        if screen:
            from mlxmerge.abliterate.screening import screen_candidates

            screened = screen_candidates(
                inst, diffs, cands, harmful_val, harmless_val, refusal_ids,
                edit_layers=lam_layers, strength=strength, pad_id=pad, batch_size=batch_size,
                seed=seed, progress=_tick(progress, "ranking", 2 * len(harmful_val)),
            )  # fmt: skip
            order = rank_screened(screened, kl_threshold)
            report["screening"] = [asdict(screened[i]) for i in order]
            cands = [cands[i] for i in order[:n_measured]]
            timings["screening_s"] = time.perf_counter() - t
        candidates = D.score_candidates(
            inst, diffs, harmful_val, harmless_val, refusal_ids, edit_layers=lam_layers,
            strength=strength, candidates=cands, pad_id=pad, batch_size=batch_size,
            progress=_tick(progress, "candidates", len(cands)),
        )  # fmt: skip
        if points is not None:
            best, why = D.select_candidate(candidates, n_layers, kl_threshold=kl_threshold,
                                           prune_fraction=0.0)  # fmt: skip
            why = f"--direction-layer {direction_layer} given: {why}"
        else:
            best, why = D.select_candidate(candidates, n_layers, kl_threshold=kl_threshold)
        if screen:
            why += f" (measured the {n_measured} best of {len(report['screening'])} ranked)"
        timings["selection_s"] = time.perf_counter() - t
        r = D.unit_np(diffs[best.layer, best.position]).astype(np.float32)
        direction = {"layer": best.layer, "position": best.position, "why": why,
                     "raw_norm": float(np.linalg.norm(diffs[best.layer, best.position]))}  # fmt: skip
        report["direction"] = direction
        report["candidates"] = [asdict(c) for c in candidates]
        report["separation"] = D.separation(means["harmful"], means["harmless"], best.position)
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
                                    batch_size=batch_size, markers=markers, progress=progress,
                                    test_prompts={"harmful": harm.test, "harmless": good.test}))  # fmt: skip
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
                  test_prompts, n_samples=4, base_path=None):  # fmt: skip
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
        answers[tag] = {"harmful": harmful, "harmless": harmless}
        bad = rate_summary([is_refusal(a, markers) for a in harmful])
        good = rate_summary([is_refusal(a, markers) for a in harmless])
        res[tag] = {
            "refusal_rate": bad["rate"], "refusal": bad,
            "harmless_refusal_rate": good["rate"], "harmless_refusal": good,
        }  # fmt: skip
    base_logits = last_logits(base, toks[("harmless", "test")], pad_id=pad, batch_size=batch_size)
    new_logits = last_logits(edited, toks[("harmless", "test")], pad_id=pad, batch_size=batch_size)
    res["after"]["kl"] = kl_divergence(base_logits, new_logits).mean().item()
    before, after = answers["before"]["harmless"], answers["after"]["harmless"]
    res["after"]["same_harmless_answers"] = sum(a == b for a, b in zip(before, after)) / len(before)
    res["n_test"] = {"harmful": len(toks[("harmful", "test")]), "harmless": len(before)}
    res["samples"] = [
        {"kind": kind, "prompt": prompts[i], "before": answers["before"][kind][i],
         "after": answers["after"][kind][i],
         "before_refusal": is_refusal(answers["before"][kind][i], markers),
         "after_refusal": is_refusal(answers["after"][kind][i], markers)}
        for kind, prompts, n in (("harmful", test_prompts["harmful"], n_samples),
                                 ("harmless", test_prompts["harmless"], max(n_samples // 2, 1)))
        for i in range(min(n, len(prompts)))
    ]  # fmt: skip
    return res


__all__ = ["abliterate", "orthogonalize_model", "parse_layers"]
