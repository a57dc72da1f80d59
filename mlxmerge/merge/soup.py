"""Model soups: average the weights of several fine-tunes of one base, scored on held-out data.

uniform soup: θ = (1/N) Σᵢ θᵢ  (the linear merge with equal weights)
greedy soup:  rank the models by their own held-out score; start from the best; add the next
              model when the uniform average of the enlarged soup scores strictly better, else
              leave it out (Wortsman et al., Model soups, ICML 2022 — https://arxiv.org/abs/2203.05482).
ensemble:     average the models' output probabilities instead (N× the inference cost).

Candidate soups are built in memory (each tensor merged in float32, cast, loaded into an mlx-lm
model) when the model fits in a third of the machine's memory, else streamed through a
temporary folder with the merge writer.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx

from mlxmerge.errors import MlxmergeError
from mlxmerge.eval.scoring import (
    Prepared,
    load_model,
    prepare,
    primary_metric,
    score_task,
    tokenizer_key,
    work_units,
)
from mlxmerge.eval.tasks import Task, load_task
from mlxmerge.io.dtypes import parse_float_dtype
from mlxmerge.lm.compute import to_compute_dtype

log = logging.getLogger(__name__)

SOUP_METHODS = ("greedy", "uniform")


def soup_recipe(models: Sequence[str], dtype: str) -> dict:
    """The mergekit recipe of the uniform soup of ``models``."""
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        "dtype": dtype,
    }


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _skeleton(config: dict):
    """An mlx-lm model of ``config`` whose (lazy, never evaluated) weights get replaced."""
    import importlib

    from mlx_lm.utils import MODEL_REMAPPING

    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    model_type = MODEL_REMAPPING.get(config["model_type"], config["model_type"])
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    return module.Model(module.ModelArgs.from_dict(config))


class CandidateBuilder:
    """Builds merge candidates of one set of models, in memory or through a temporary folder.

    ``recipe`` is any candidate (it sizes the model and checks every architecture up front);
    ``build(recipe)`` returns an mlx-lm model of another recipe over the same models. In memory,
    each tensor goes through the merge runner's ``compute_tensor`` with the recipe's dtype as the
    output dtype, as ``merge`` writes it, so a candidate scores as its written model does.
    """

    def __init__(self, recipe: dict, in_memory: bool | None):
        from mlxmerge.merge.runner import plan_merge

        self.dtype_name = recipe.get("dtype") or "bfloat16"
        self.dtype = parse_float_dtype(self.dtype_name)
        plan = plan_merge(recipe)  # checks every architecture up front
        self.size = sum(math.prod(p.shape) for p in plan.tensors) * self.dtype.size
        if in_memory is None:
            mem = _physical_memory()
            in_memory = mem is None or 3 * self.size < mem
        self.in_memory = in_memory
        self.how = "built in memory" if in_memory else "streamed through a temporary folder"
        log.info("candidates (%.1f MB each): %s", self.size / 1e6, self.how)
        self._tmp = None if in_memory else Path(tempfile.mkdtemp(prefix="mlxmerge-candidate-"))

    def build(self, recipe: dict, seed: int = 0):
        from mlxmerge.merge.runner import compute_tensor, merge, plan_merge, prepare

        if not self.in_memory:
            out = merge(recipe, self._tmp / "candidate", seed=seed, force=True)
            model, _ = load_model(str(out))
            return model
        plan = plan_merge(recipe)
        prepare(plan)  # model-wide statistics (TIES trim_scope: model), as merge runs them
        weights = {}
        for p in plan.tensors:
            w = compute_tensor(plan, p.name, seed, out_dtype=self.dtype).astype(self.dtype)
            mx.eval(w)
            weights[p.name] = w
        model = _skeleton(plan.config)
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        model.load_weights(list(weights.items()), strict=True)
        model.eval()
        # Scored as lm.load runs any model (float32 on a CPU), after the cast to the soup's dtype.
        to_compute_dtype(model, label="candidate soup")
        mx.eval(model.parameters())
        return model

    def close(self):
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def soup(
    models: Sequence[str], output: str | Path | None, *, eval_task: str | Path | Task,
    method: str = "greedy", ensemble: bool = False, normalize: bool = False,
    batch_size: int = 16, max_length: int = 512, max_tokens: int = 32, extract: str | None = None,
    chat: bool = False, out_dtype: str | None = None, layout: str = "mlx", force: bool = False,
    quantize_bits: int | None = None, group_size: int = 64, in_memory: bool | None = None,
    gguf_type: str | None = None,
    on_step: Callable[[dict], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:  # fmt: skip
    """Build a uniform or greedy soup of ``models`` selected on ``eval_task`` and write it to
    ``output`` (skipped when ``output`` is None; ``quantize_bits`` writes it MLX-quantized).
    Returns scores, steps and the recipe.

    ``on_step(step)`` gets each score as it is known; ``progress(label, done, total)`` is called
    per scored batch, ``label`` naming the candidate being built and scored."""
    from mlxmerge.io import open_checkpoint
    from mlxmerge.io.output import check_output
    from mlxmerge.merge.runner import merge

    if method not in SOUP_METHODS:
        raise MlxmergeError(f"unknown soup method {method!r}; expected greedy or uniform")
    if output is not None and quantize_bits and layout != "mlx":
        raise MlxmergeError("a quantized soup needs --format mlx (transformers cannot read it)")
    models = [str(m) for m in models]
    if len(models) < 2:
        raise MlxmergeError(f"a soup needs at least two models, got {len(models)}")
    if len(set(models)) != len(models):
        raise MlxmergeError("a model is given twice; each ingredient must be a different model")
    task = eval_task if isinstance(eval_task, Task) else load_task(eval_task)
    dtype = out_dtype or "bfloat16"
    parse_float_dtype(dtype)
    if output is not None:
        check_output(Path(output), models, force=force)
    paths = [open_checkpoint(m).path for m in models]
    keys = {tokenizer_key(p) for p in paths}
    if len(keys) > 1:
        log.warning("the models' tokenizer files differ; the soup uses the first model's tokenizer")
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(paths[0])
    prepared = prepare(task, tokenizer, max_length=max_length, chat=chat)
    metric = primary_metric(task, normalize)
    sign = 1.0 if task.higher_is_better else -1.0
    kw = {"batch_size": batch_size, "max_tokens": max_tokens, "extract": extract}
    builder = CandidateBuilder(soup_recipe(models, dtype), in_memory)

    total = work_units(prepared)

    def score(ingredients: Sequence[str]) -> float:
        label = ingredients[0] if len(ingredients) == 1 else f"soup of {len(ingredients)}"
        done = [0]

        def step(k: int) -> None:
            done[0] += k
            progress(label, done[0], total)

        if progress:
            progress(label, 0, total)  # building a candidate takes time too: say which one
        model = builder.build(soup_recipe(ingredients, dtype))
        value = score_task([model], tokenizer, prepared, progress=step if progress else None,
                           **kw)[metric]  # fmt: skip
        del model
        mx.clear_cache()
        return value

    def report(step: dict):
        log.info("%s", step)
        if on_step:
            on_step(step)

    try:
        individual = []
        for m in models:
            s = score([m])
            individual.append({"model": m, "score": s})
            report({"stage": "individual", "model": m, "score": s})
        ranked = sorted(individual, key=lambda r: sign * r["score"], reverse=True)
        steps = []
        if method == "uniform":
            ingredients = list(models)
            best = score(ingredients)
            steps.append(
                {"candidate": "all", "score": best, "kept": True, "soup": list(ingredients)}
            )
            report({"stage": "soup", **steps[-1]})
        else:
            ingredients = [ranked[0]["model"]]
            best = ranked[0]["score"]
            steps.append(
                {
                    "candidate": ingredients[0],
                    "score": best,
                    "kept": True,
                    "soup": list(ingredients),
                }
            )
            report({"stage": "soup", **steps[-1]})
            for r in ranked[1:]:
                s = score(ingredients + [r["model"]])
                kept = sign * s > sign * best
                if kept:
                    ingredients.append(r["model"])
                    best = s
                steps.append(
                    {"candidate": r["model"], "score": s, "kept": kept, "soup": list(ingredients)}
                )
                report({"stage": "soup", **steps[-1]})
    finally:
        builder.close()

    result = {
        "method": method, "task": task.name, "metric": metric,
        "higher_is_better": task.higher_is_better, "built": builder.how,
        "individual": individual, "best_single": ranked[0], "steps": steps,
        "ingredients": ingredients, "score": best, "recipe": soup_recipe(ingredients, dtype),
        "ensemble": None, "output": None,
    }  # fmt: skip
    if ensemble:
        loaded = [load_model(m)[0] for m in models]  # not the paths: BASE+ADAPTER's is the base
        log.info("ensemble of %d models: %d forward passes per token", len(loaded), len(loaded))
        result["ensemble"] = score_task(loaded, tokenizer, prepared, **kw)[metric]
        report({"stage": "ensemble", "score": result["ensemble"]})
        del loaded
        mx.clear_cache()
    if output is not None:
        result["output"] = str(
            merge(
                result["recipe"],
                output,
                layout=layout,
                force=force,
                quantize_bits=quantize_bits,
                group_size=group_size,
                gguf_type=gguf_type,
            )
        )
    return result


def ensemble_score(models: Sequence[str], eval_task: str | Path | Task, **kw) -> float:
    """Score of the output-averaged ensemble of ``models`` (all loaded at once)."""
    task = eval_task if isinstance(eval_task, Task) else load_task(eval_task)
    loaded = [load_model(m) for m in models]
    tokenizer = loaded[0][1]
    prepared: Prepared = prepare(task, tokenizer, max_length=kw.pop("max_length", 512))
    normalize = kw.pop("normalize", False)
    return score_task([m for m, _ in loaded], tokenizer, prepared, **kw)[
        primary_metric(task, normalize)
    ]
