"""Evolve a merge recipe: CMA-ES over a mergekit-evolve genome, scored on task files.

The loop is mergekit-evolve's (``mergekit/scripts/evolve.py``): CMA-ES (Hansen's ``cma``
package, ``sigma0`` 1/6 by default) minimizes −score of the candidates it proposes; the best
candidate seen is the result. Differences, each for a reason:

* candidates are built in memory (``merge.soup.CandidateBuilder``) when they fit, else streamed
  through a temporary folder, and scored with ``mlxmerge.eval``: no CUDA, vLLM or Ray;
* the starting genotype is scored first (candidate 1), so the result is never worse on the
  search split than mergekit's default recipe;
* the budget is exact (``maxfevals`` in mergekit ends after the generation that passes it);
* CMA-ES draws from its own seeded generator and the state file holds every score, so a
  resumed search ends exactly where the uninterrupted one would;
* the best recipe is re-scored on held-out data and written with ``merge``, mask seed 0 (DARE),
  so ``mlxmerge merge OUT/mlxmerge_config.yml`` rebuilds the same bytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmerge.errors import MlxmergeError, NonFiniteError, RecipeError
from mlxmerge.evolve.config import EvolveConfig, parse_config
from mlxmerge.evolve.genome import Genome
from mlxmerge.evolve.state import default_path, read_state, write_state

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 100  # mergekit-evolve's --max-fevals
SIGMA0 = 1 / 6  # mergekit-evolve's --sigma0
WORST = 1e30  # cost of a candidate that cannot be built or scores NaN (CMA-ES only ranks costs)


def parse_duration(text: str | float | None) -> float | None:
    """Seconds of ``90``, ``90s``, ``30m``, ``2h`` or ``1h30m``; None passes."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*",
                         str(text))  # fmt: skip
    if not parts or not any(parts.groups()) or not str(text).strip():
        raise MlxmergeError(f"--time {text!r}: expected a duration such as 90s, 30m, 2h or 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return 3600 * h + 60 * m + s


def _cma(x0: np.ndarray, sigma0: float, popsize: int | None, seed: int):
    try:
        import cma
    except ImportError:
        raise MlxmergeError("evolve needs the cma package: pip install cma") from None
    rng = np.random.default_rng(seed)
    opts = {
        # CMA-ES's own generator (not numpy's global one): what scoring does cannot shift it
        "randn": lambda *shape: rng.standard_normal(shape),
        "seed": float("nan"),
        "verbose": -9, "verb_log": 0, "verb_disp": 0,
        # the budget and the clock end the search; a flat or converged score does not
        "tolfun": 0, "tolfunhist": 0, "tolx": 0, "tolflatfitness": 10**9, "tolstagnation": 10**9,
    }  # fmt: skip
    if popsize is not None:
        opts["popsize"] = popsize
    return cma.CMAEvolutionStrategy(list(x0), sigma0, opts)


class _Search:
    """One search's models, objective, builder and history."""

    def __init__(self, config: EvolveConfig, out_dtype: str, in_memory: bool | None):
        from mlx_lm.utils import load_tokenizer

        from mlxmerge.evolve.objective import Objective, load_tasks
        from mlxmerge.io import open_checkpoint
        from mlxmerge.merge.soup import CandidateBuilder

        load_tasks(config)  # every task file checked before any model is opened
        self.config = config
        d = config.genome
        first = open_checkpoint(d.models[0])
        if first.num_layers is None:
            raise RecipeError(f"{d.models[0]}: no decoder layers found; the genome needs layers")
        self.genome = Genome(d, first.num_layers)
        self.dtype = out_dtype
        x0 = self.genome.initial()
        self.builder = CandidateBuilder(self.genome.recipe(x0, out_dtype), in_memory)
        self.objective = Objective(config, load_tokenizer(first.path))

    def run(self, genes: np.ndarray, split: str = "search") -> dict:
        """Build and score one genotype: score, per-task metrics, seconds to build and score."""
        recipe = self.genome.recipe(genes, self.dtype)
        t0 = time.perf_counter()
        try:
            model = self.builder.build(recipe)
        except NonFiniteError as e:
            log.warning("candidate not built: %s", e)
            return {"score": None, "scores": {}, "build_seconds": 0.0, "score_seconds": 0.0}
        t1 = time.perf_counter()
        score, per_task = self.objective.score(model, split)
        del model
        mx.clear_cache()
        t2 = time.perf_counter()
        return {"score": score if math.isfinite(score) else None, "scores": per_task,
                "build_seconds": t1 - t0, "score_seconds": t2 - t1}  # fmt: skip

    def close(self):
        self.builder.close()


def _best(candidates: list[dict]) -> dict | None:
    scored = [c for c in candidates if c["score"] is not None]
    return max(scored, key=lambda c: c["score"]) if scored else None  # first of equals wins


def evolve(
    config: str | Path | dict | EvolveConfig, output: str | Path, *, budget: int | None = None,
    time_limit: str | float | None = None, seed: int = 0, sigma0: float = SIGMA0,
    popsize: int | None = None, out_dtype: str = "bfloat16", in_memory: bool | None = None,
    resume: bool = False, force: bool = False, state: str | Path | None = None,
    plot: str | Path | None = None, dry_run: bool = False,
    on_candidate: Callable[[dict], None] | None = None,
) -> dict:  # fmt: skip
    """Search the genome of ``config`` with CMA-ES and write the best merge to ``output``.

    ``budget``: candidates to score (the starting one included; default 100, mergekit's
    ``--max-fevals``); ``time_limit``: stop starting candidates after this long (seconds or
    "30m"); either or both. ``seed`` drives CMA-ES (and ``random_init``); the merges themselves
    use mask seed 0. The state file (default ``OUT.evolve.json``) is rewritten after every
    candidate; ``resume`` continues it. ``dry_run`` checks everything, times the starting
    candidate and returns the estimate without searching or writing.
    ``on_candidate(event)`` gets a dict per scored candidate (and one for a resume).

    Returns the report (also written as ``evolve.json`` in ``output``). Raises
    ``MlxmergeError`` subclasses for every problem with the config, tasks, models or output.
    """
    from mlxmerge.io.dtypes import parse_float_dtype
    from mlxmerge.io.output import check_output

    cfg = config if isinstance(config, EvolveConfig) else parse_config(config)
    limit = parse_duration(time_limit)
    if budget is None and limit is None:
        budget = DEFAULT_BUDGET
    if budget is not None and budget < 1:
        raise MlxmergeError(f"--budget must be at least 1 candidate (got {budget})")
    if sigma0 <= 0:
        raise MlxmergeError(f"--sigma0 must be positive (got {sigma0})")
    if popsize is not None and popsize < 2:
        raise MlxmergeError(f"--population must be at least 2 (got {popsize})")
    parse_float_dtype(out_dtype)
    output = Path(output).expanduser()
    inputs = list(cfg.genome.models) + ([cfg.genome.base_model] if cfg.genome.base_model else [])
    check_output(output, inputs, force=force)
    if plot is not None:
        from mlxmerge.evolve.report import check_plot

        check_plot(plot)
    state_path = Path(state).expanduser() if state else default_path(output)
    _check_state_path(state_path, output, cfg, config, inputs)
    if not dry_run and not resume and state_path.exists() and not force:
        raise MlxmergeError(
            f"{state_path}: a state file of an earlier search exists; continue it with --resume "
            "or start over with --force"
        )

    search = _Search(cfg, out_dtype, in_memory)
    try:
        if dry_run:
            return _dry_run(search, budget, limit, popsize)
        return _search(search, output, budget=budget, limit=limit, seed=seed, sigma0=sigma0,
                       popsize=popsize, resume=resume, force=force, state_path=state_path,
                       plot=plot, on_candidate=on_candidate, config_source=config)  # fmt: skip
    finally:
        search.close()


def _population(genome: Genome, popsize: int | None) -> int:
    # cma's default: 4 + ⌊3 ln N⌋
    return popsize or 4 + int(3 * math.log(genome.size))


def _dry_run(search: _Search, budget: int | None, limit: float | None, popsize: int | None) -> dict:
    g = search.genome
    one = search.run(g.initial())
    per = one["build_seconds"] + one["score_seconds"]
    n = budget if budget is not None else max(1, int(limit // per) if per > 0 else 1)
    if budget is not None and limit is not None:
        n = min(budget, max(1, int(limit // per))) if per > 0 else budget
    return {
        "dry_run": True,
        "genome_shape": list(g.shape),
        "genome_size": g.size,
        "parameters": list(g.params),
        "population": _population(g, popsize),
        "candidate_bytes": search.builder.size,
        "built": search.builder.how,
        "sequences_per_candidate": search.objective.work("search"),
        "held_out_sequences": search.objective.work("held_out"),
        "build_seconds": one["build_seconds"],
        "score_seconds": one["score_seconds"],
        "start_score": one["score"],
        "candidates": n,
        # the search, then the held-out scoring of the best and the start (about 2 candidates)
        "estimated_seconds": per * (n + 2),
        "start_recipe": g.recipe(g.initial(), search.dtype),
    }


def _check_state_path(state_path: Path, output: Path, cfg, config, inputs) -> None:
    """Refuse a state file that is a folder, an input (config, task file, model) or inside one,
    or inside the output (it would fill the folder the result is renamed into)."""
    from mlxmerge.io.output import input_paths

    if state_path.is_dir():
        raise MlxmergeError(f"--state {state_path}: is a folder; name a file")
    where = state_path.resolve()
    files = [Path(t.name) for t in cfg.tasks] + [Path(t.held_out) for t in cfg.tasks if t.held_out]
    if isinstance(config, (str, os.PathLike)):
        files.append(Path(config))
    guarded = [p.expanduser().resolve() for p in files]
    guarded += [p for ref in inputs for p in input_paths(ref)] + [output.resolve()]
    for p in guarded:
        if where == p or where.is_relative_to(p):
            raise MlxmergeError(f"--state {state_path}: would overwrite or sit inside {p}")


def _search(search: _Search, output: Path, *, budget, limit, seed, sigma0, popsize, resume,
            force, state_path, plot, on_candidate, config_source) -> dict:  # fmt: skip
    from mlxmerge.evolve.report import write_result

    cfg, g = search.config, search.genome
    x0 = g.initial(np.random.default_rng([seed, 1]) if cfg.random_init else None)
    es = _cma(x0, sigma0, popsize, seed)
    header = {"config": cfg.digest(), "seed": seed, "sigma0": sigma0,
              "population": es.popsize, "dtype": search.dtype, "genome_size": g.size}  # fmt: skip
    stored = read_state(state_path, header) if resume else []
    candidates: list[dict] = []
    t_start = time.perf_counter()
    emit = on_candidate or (lambda event: None)
    if stored:
        best = _best(stored)
        emit({"event": "resume", "candidates": len(stored), "state": str(state_path),
              "best": None if best is None else best["score"]})  # fmt: skip
    stopped = "budget"

    def evaluate(genes: np.ndarray, generation: int) -> float:
        i = len(candidates)
        if i < len(stored):
            c = stored[i]
            if not np.array_equal(np.asarray(c["genes"], dtype=np.float64), genes):
                raise MlxmergeError(
                    f"{state_path}: candidate {i + 1} differs from the one this search proposes "
                    "(another cma version?); start over with --force"
                )
            candidates.append(c)
        else:
            result = search.run(genes)
            c = {"index": i + 1, "generation": generation, "genes": [float(v) for v in genes],
                 **result}  # fmt: skip
            candidates.append(c)
            write_state(state_path, header, candidates)
            best = _best(candidates)
            elapsed = time.perf_counter() - t_start
            new = len(candidates) - len(stored)
            eta = None
            if budget is not None:
                eta = elapsed / new * (budget - len(candidates))
            emit({"event": "candidate", "index": i + 1, "budget": budget, "generation": generation,
                  "score": c["score"], "best": None if best is None else best["score"],
                  "best_index": None if best is None else best["index"], "elapsed": elapsed,
                  "eta": eta, "scores": c["scores"]})  # fmt: skip
        return WORST if c["score"] is None else -c["score"]

    def more() -> bool:
        nonlocal stopped
        if budget is not None and len(candidates) >= budget:
            stopped = "budget"
            return False
        if len(candidates) < len(stored):
            return True  # replaying the stored part costs no time
        if limit is not None and time.perf_counter() - t_start >= limit:
            stopped = "time"
            return False
        return True

    evaluate(np.asarray(x0, dtype=np.float64), 0)
    generation = 0
    while more():
        generation += 1
        xs = es.ask()
        costs = []
        for x in xs:
            if not more():
                break
            costs.append(evaluate(np.asarray(x, dtype=np.float64), generation))
        if len(costs) < len(xs):
            break
        es.tell(xs, costs)
        if es.stop():
            stopped = "cma: " + ", ".join(es.stop())
            break
    if stored and len(candidates) < len(stored):
        log.warning("the state file holds %d candidates, the budget %d; the first %d count",
                    len(stored), budget, len(candidates))  # fmt: skip
    best = _best(candidates)
    if best is None:
        raise MlxmergeError("no candidate could be built and scored; see the warnings above")
    start = candidates[0]
    held = {"best": search.run(np.asarray(best["genes"]), "held_out")}
    held["start"] = (
        held["best"] if best is start else search.run(np.asarray(start["genes"]), "held_out")
    )
    report = {
        "config": str(config_source) if not isinstance(config_source, dict) else "(dict)",
        "merge_method": cfg.genome.merge_method, "genome_shape": list(g.shape),
        "genome_size": g.size, "parameters": list(g.params), "population": es.popsize,
        "sigma0": sigma0, "seed": seed, "budget": budget, "time_limit": limit,
        "stopped": stopped, "candidates": len(candidates), "built": search.builder.how,
        "search_seconds": sum(c["build_seconds"] + c["score_seconds"] for c in candidates),
        "start": {"search": start["score"], "search_tasks": start["scores"],
                  "held_out": held["start"]["score"], "held_out_tasks": held["start"]["scores"],
                  "recipe": g.recipe(np.asarray(start["genes"]), search.dtype)},
        "best": {"index": best["index"], "search": best["score"], "search_tasks": best["scores"],
                 "held_out": held["best"]["score"], "held_out_tasks": held["best"]["scores"],
                 "genes": best["genes"],
                 "values": {k: v.tolist() for k, v in g.values(np.asarray(best["genes"])).items()},
                 "recipe": g.recipe(np.asarray(best["genes"]), search.dtype)},
        "history": [{k: c[k] for k in ("index", "generation", "score", "scores")} for c in candidates],
        "state": str(state_path),
    }  # fmt: skip
    report["output"] = str(write_result(report, output, plot=plot, force=force))
    return report


def load_report(output: str | Path) -> dict:
    """The ``evolve.json`` report written into ``output``."""
    return json.loads((Path(output) / "evolve.json").read_text())
