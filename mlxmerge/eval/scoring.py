"""Score mlx-lm models on a task: perplexity, multiple-choice accuracy, exact match, votes.

Every function takes a *list* of models: one model is the plain case, several are an
output-averaged ensemble (``log p = log mean_m p_m``, N× the inference cost), as in the
model-soups paper.

* perplexity  = exp(Σ −log p(xₜ | x<ₜ) / T) over every token after the first of each document
* choice      = argmax_c Σ log p(c | prompt)   (``accuracy``),
                argmax_c Σ log p(c | prompt) / bytes(c)   (``accuracy_norm``, lm-eval's acc_norm)
* generation  = exact match of the extracted answer; with N samples, majority or best-of votes
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx import nn

from mlxmerge.errors import MlxmergeError
from mlxmerge.eval.tasks import (
    CHOICE,
    GENERATION,
    PERPLEXITY,
    Task,
    compile_extract,
    extract_answer,
)
from mlxmerge.lm.chat import chat_tokens, eos_token_ids, pad_token_id
from mlxmerge.lm.generate import Sample, sample
from mlxmerge.lm.logprobs import token_logprobs

log = logging.getLogger(__name__)

VOTES = ("majority", "best-of")
Progress = Callable[[int], None] | None


# -- log-likelihood -----------------------------------------------------------------------------


def document_windows(tokenizer, documents: Sequence[str], max_length: int) -> list[list[int]]:
    """Token windows of at most ``max_length``; consecutive windows of a document share one token,
    so every token after a document's first is predicted exactly once."""
    if max_length < 2:
        raise MlxmergeError(f"max length must be at least 2 tokens (got {max_length})")
    windows = []
    for doc in documents:
        ids = tokenizer.encode(doc)
        for start in range(0, max(len(ids) - 1, 1), max_length - 1):
            w = ids[start : start + max_length]
            if len(w) >= 2:
                windows.append(w)
    return windows


def perplexity(models, windows: list[list[int]], n_bytes: int, **kw) -> dict:
    """Perplexity, mean negative log-likelihood per token and bits per UTF-8 byte."""
    lps = token_logprobs(models, windows, **kw)
    nll = -float(sum(np.sum(lp, dtype=np.float64) for lp in lps))
    n = sum(len(lp) for lp in lps)
    if n == 0:
        raise MlxmergeError("the text has no token to predict; give longer documents")
    return {
        "perplexity": math.exp(nll / n),
        "nll_per_token": nll / n,
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "tokens": n,
    }


def choice_requests(tokenizer, items) -> list[tuple[list[int], int]]:
    """(tokens of prompt + choice, number of prompt tokens) for every choice of every item."""
    reqs = []
    for item in items:
        ctx = tokenizer.encode(item.prompt)
        for c in item.choices:
            whole = tokenizer.encode(item.prompt + c)
            if len(whole) <= len(ctx) or whole[: len(ctx)] != ctx:
                # The choice merged into the prompt's last token: score it on its own tokens.
                whole = ctx + tokenizer.encode(c, add_special_tokens=False)
            reqs.append((whole, len(ctx)))
    return reqs


def choice_scores(models, items, requests, **kw) -> dict:
    """Accuracy (sum log-likelihood) and length-normalized accuracy, plus per-item choices."""
    lps = token_logprobs(models, [r[0] for r in requests], **kw)
    sums = [
        float(np.sum(lp[n_ctx - 1 :], dtype=np.float64)) for lp, (_, n_ctx) in zip(lps, requests)
    ]
    k, picks, picks_norm = 0, [], []
    for item in items:
        s = sums[k : k + len(item.choices)]
        norm = [v / len(c.encode("utf-8")) for v, c in zip(s, item.choices)]
        picks.append(int(np.argmax(s)))
        picks_norm.append(int(np.argmax(norm)))
        k += len(item.choices)
    answers = [item.answer for item in items]
    return {
        "accuracy": float(np.mean([p == a for p, a in zip(picks, answers)])),
        "accuracy_norm": float(np.mean([p == a for p, a in zip(picks_norm, answers)])),
        "items": len(items),
        "predictions": picks,
        "predictions_norm": picks_norm,
    }


# -- generation -----------------------------------------------------------------------------------


def vote_budgets(n: int) -> list[int]:
    """1, 2, 4, ... up to and including ``n``."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def _majority(answers: list[str]) -> str:
    # Most frequent non-empty answer; ties go to the one seen first.
    counts = Counter(a for a in answers if a)
    if not counts:
        return ""
    best = max(counts.values())
    return next(a for a in answers if counts.get(a) == best)


def _best_of(answers: list[str], samples: list[Sample]) -> str:
    # The sample the model itself finds most likely per token (no external verifier).
    means = [s.logprob / max(s.cost, 1) for s in samples]
    return answers[int(np.argmax(means))]


def generation_scores(tokenizer, items, samples: list[list[Sample]], extract, vote: str) -> dict:
    """Exact match of the first sample, and majority / best-of / any-correct accuracy against
    the number of samples spent (1, 2, 4, ... N) with the tokens generated."""
    if vote not in VOTES:
        raise MlxmergeError(f"unknown vote {vote!r}; expected one of {', '.join(VOTES)}")
    pattern = compile_extract(extract)
    texts = [[tokenizer.decode(s.tokens) for s in row] for row in samples]
    answers = [[extract_answer(t, pattern) for t in row] for row in texts]
    truth = [item.answer.strip() for item in items]
    n = len(samples[0]) if samples else 0
    curve = []
    for k in vote_budgets(n):
        maj = [_majority(a[:k]) == g for a, g in zip(answers, truth)]
        best = [_best_of(a[:k], s[:k]) == g for a, g, s in zip(answers, truth, samples)]
        anyc = [g in a[:k] for a, g in zip(answers, truth)]
        tokens = sum(s.cost for row in samples for s in row[:k])
        acc = float(np.mean(maj if vote == "majority" else best))
        curve.append({
            "samples": k, "majority": float(np.mean(maj)), "best_of": float(np.mean(best)),
            "any_correct": float(np.mean(anyc)), "tokens": tokens,
            "tokens_per_correct": tokens / (acc * len(items)) if acc > 0 else None,
        })  # fmt: skip
    first = [a[0] == g for a, g in zip(answers, truth)]
    result = {
        "exact_match": curve[-1]["majority" if vote == "majority" else "best_of"],
        "exact_match_first_sample": float(np.mean(first)),
        "items": len(items),
        "tokens": curve[-1]["tokens"],
        "answers": [a[0] for a in answers],
    }
    if n > 1:
        result["vote"] = vote
        result["curve"] = curve
    return result


# -- one task, prepared once per tokenizer ---------------------------------------------------------


@dataclass
class Prepared:
    """A task tokenized for one tokenizer; shared by every model that uses it."""

    task: Task
    windows: list | None = None
    n_bytes: int = 0
    requests: list | None = None
    prompts: list | None = None


def prepare(task: Task, tokenizer, *, max_length: int = 512, chat: bool = False,
            system: str | None = None) -> Prepared:  # fmt: skip
    if task.kind == PERPLEXITY:
        windows = document_windows(tokenizer, task.documents, max_length)
        n_bytes = sum(len(d.encode("utf-8")) for d in task.documents)
        return Prepared(task, windows=windows, n_bytes=n_bytes)
    if task.kind == CHOICE:
        return Prepared(task, requests=choice_requests(tokenizer, task.items))
    prompts = [it.prompt for it in task.items]
    if chat:
        return Prepared(task, prompts=chat_tokens(tokenizer, prompts, system=system))
    return Prepared(task, prompts=[tokenizer.encode(p) for p in prompts])


PRIMARY = {PERPLEXITY: "perplexity", CHOICE: "accuracy", GENERATION: "exact_match"}


def primary_metric(task: Task, normalize: bool = False) -> str:
    return "accuracy_norm" if task.kind == CHOICE and normalize else PRIMARY[task.kind]


def score_task(
    models: Sequence[nn.Module], tokenizer, prepared: Prepared, *, batch_size: int = 16,
    max_tokens: int = 32, extract: str | None = None, samples: int = 1, vote: str = "majority",
    temperature: float | None = None, top_p: float = 1.0, seed: int = 0, progress: Progress = None,
) -> dict:  # fmt: skip
    """All metrics of one task for one model (or an ensemble of ``models``)."""
    task = prepared.task
    pad = pad_token_id(tokenizer)
    if task.kind == PERPLEXITY:
        return perplexity(models, prepared.windows, prepared.n_bytes, batch_size=batch_size,
                          pad_id=pad, progress=progress)  # fmt: skip
    if task.kind == CHOICE:
        return choice_scores(models, task.items, prepared.requests, batch_size=batch_size,
                             pad_id=pad, progress=progress)  # fmt: skip
    if samples < 1:
        raise MlxmergeError(f"--samples must be at least 1 (got {samples})")
    if temperature is None:
        temperature = 0.0 if samples == 1 else 0.7
    drawn = sample(
        models, prepared.prompts, eos_ids=eos_token_ids(tokenizer), n=samples,
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, pad_id=pad,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    result = generation_scores(tokenizer, task.items, drawn, extract, vote)
    result["temperature"] = temperature
    return result


def work_units(prepared: Prepared, samples: int = 1) -> int:
    """How many progress units ``score_task`` reports for this task."""
    if prepared.windows is not None:
        return len(prepared.windows)
    if prepared.requests is not None:
        return len(prepared.requests)
    return len(prepared.prompts) * samples


# -- several models, several tasks ----------------------------------------------------------------


def load_model(ref):
    """(model, tokenizer) through mlx-lm, after validating the checkpoint's headers."""
    from mlxmerge.lm.load import load

    return load(ref, verb="eval")


def tokenizer_key(path) -> str:
    """Models whose tokenizer files are byte-identical share tokenized data."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"):
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode() + f.read_bytes())
    return h.hexdigest()


class _Counter:
    """Turns per-batch counts into ``progress(label, done, total)`` calls."""

    def __init__(self, label: str, total: int, progress):
        self.label, self.total, self.done, self.progress = label, total, 0, progress

    def add(self, k: int) -> None:
        self.done += k
        if self.progress:
            self.progress(self.label, self.done, self.total)


def _task_summary(t: Task, normalize: bool) -> dict:
    size = len(t)
    return {"name": t.name, "kind": t.kind, "path": str(t.path), "size": size,
            "metric": primary_metric(t, normalize)}  # fmt: skip


def evaluate(
    models: Sequence[str], tasks: Sequence[str | Task], *, batch_size: int = 16,
    max_length: int = 512, max_tokens: int = 32, extract: str | None = None, chat: bool = False,
    normalize: bool = False, samples: int = 1, vote: str = "majority",
    temperature: float | None = None, top_p: float = 1.0, seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:  # fmt: skip
    """Score every model on every task; models are loaded one at a time and models with the same
    tokenizer share the tokenized tasks. ``progress(label, done, total)`` is called per batch."""
    from mlxmerge.eval.tasks import load_task
    from mlxmerge.io import open_checkpoint
    from mlxmerge.lm.load import check_supported

    tasks = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    seen: Counter = Counter()
    for t in tasks:  # two files with one stem get distinct names
        seen[t.name] += 1
        if seen[t.name] > 1:
            t.name = f"{t.name}#{seen[t.name]}"
    if not models:
        raise MlxmergeError("give at least one model")
    if vote not in VOTES:
        raise MlxmergeError(f"unknown vote {vote!r}; expected one of {', '.join(VOTES)}")
    if samples > 1 and not any(t.kind == GENERATION for t in tasks):
        raise MlxmergeError("--samples needs a generation task (.jsonl with prompt and answer)")
    compile_extract(extract)
    ckpts = [open_checkpoint(m) for m in models]  # every header checked before any load
    for ckpt in ckpts:
        check_supported(ckpt.model_type, "eval")
    cache: dict[tuple[str, str], Prepared] = {}
    results = []
    for ref, ckpt in zip(models, ckpts):
        path = ckpt.path
        # The checkpoint, not its path: for BASE+ADAPTER the path is the base alone.
        model, tokenizer = load_model(ckpt)
        key = tokenizer_key(path)
        for task in tasks:
            if (key, task.name) not in cache:
                cache[key, task.name] = prepare(task, tokenizer, max_length=max_length, chat=chat)
            prepared = cache[key, task.name]
            step = _Counter(f"{ref} · {task.name}", work_units(prepared, samples), progress)
            metrics = score_task(
                [model], tokenizer, prepared, batch_size=batch_size, max_tokens=max_tokens,
                extract=extract, samples=samples, vote=vote, temperature=temperature,
                top_p=top_p, seed=seed, progress=step.add,
            )  # fmt: skip
            metric = primary_metric(task, normalize)
            results.append({"model": ref, "task": task.name, "kind": task.kind,
                            "metric": metric, "score": metrics[metric], "metrics": metrics})  # fmt: skip
            log.info("%s on %s: %s = %.4g", ref, task.name, metric, metrics[metric])
        del model
        mx.clear_cache()
    ranking = {}
    for task in tasks:
        rows = [r for r in results if r["task"] == task.name]
        rows.sort(key=lambda r: r["score"], reverse=task.higher_is_better)
        ranking[task.name] = [r["model"] for r in rows]
    return {
        "tasks": [_task_summary(t, normalize) for t in tasks],
        "results": results,
        "ranking": ranking,
    }
