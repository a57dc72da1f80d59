"""What a candidate is scored on: the config's tasks, split into a search and a held-out part.

score = Σ weight · metric over the tasks (mergekit-evolve's ``_eval_model``), each metric from
``mlxmerge.eval.scoring.score_task`` on the search split while searching and on the held-out
split for the final report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlx import nn

from mlxmerge.errors import RecipeError
from mlxmerge.eval.scoring import Prepared, prepare, score_task, work_units
from mlxmerge.eval.tasks import PERPLEXITY, Task, compile_extract, load_task
from mlxmerge.evolve.config import EvolveConfig, TaskSpec, check_metric

log = logging.getLogger(__name__)


@dataclass
class ScoredTask:
    spec: TaskSpec
    metric: str
    search: Prepared
    held_out: Prepared


def _limit(task: Task, n: int | None) -> Task:
    if n is None or len(task) <= n:
        return task
    cut = Task(task.name, task.kind, task.path)
    if task.kind == PERPLEXITY:
        cut.documents = task.documents[:n]
    else:
        cut.items = task.items[:n]
    return cut


def load_tasks(config: EvolveConfig) -> list[tuple[TaskSpec, str, Task, Task]]:
    """(spec, metric, search split, held-out split) of every task; every file is read and checked
    here, before any model is loaded."""
    out = []
    for i, spec in enumerate(config.tasks):
        where = f"tasks[{i}] ({spec.name})"
        task = load_task(spec.name)
        compile_extract(spec.extract)
        if spec.held_out is not None:
            held = load_task(spec.held_out)
            if held.kind != task.kind:
                raise RecipeError(
                    f"{where}: held_out {spec.held_out} is a {held.kind} task, {spec.name} a "
                    f"{task.kind} task; they must be the same kind"
                )
            search = task
        else:
            if len(task) < 2:
                raise RecipeError(
                    f"{where}: {len(task)} item(s) cannot be split into a search and a held-out "
                    "part; add items or give a held_out file"
                )
            search, held = task.split(config.search_fraction)
        metric = check_metric(spec, task.kind, where)
        out.append((spec, metric, _limit(search, config.limit), held))
    return out


class Objective:
    """Scores built candidate models on the search or the held-out splits."""

    def __init__(self, config: EvolveConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.tasks = []
        kw = {"max_length": config.max_length, "chat": config.apply_chat_template}
        for spec, metric, search, held in load_tasks(config):
            self.tasks.append(
                ScoredTask(
                    spec, metric, prepare(search, tokenizer, **kw), prepare(held, tokenizer, **kw)
                )
            )

    def work(self, split: str = "search") -> int:
        """Sequences scored per candidate (the unit of its cost)."""
        return sum(work_units(getattr(t, split)) for t in self.tasks)

    def score(self, model: nn.Module, split: str = "search") -> tuple[float, dict[str, float]]:
        """(Σ weight · metric, {task file: metric}) of ``model`` on ``split``."""
        total, per_task = 0.0, {}
        for t in self.tasks:
            metrics = score_task(
                [model], self.tokenizer, getattr(t, split), batch_size=self.config.batch_size,
                max_tokens=self.config.max_tokens, extract=t.spec.extract,
            )  # fmt: skip
            value = float(metrics[t.metric])
            per_task[t.spec.name] = value
            total += t.spec.weight * value
        return total, per_task
