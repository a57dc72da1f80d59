"""The ``mlxmerge evolve`` config: mergekit-evolve's YAML schema, with task files for lm-eval tasks.

```yaml
genome:                      # mergekit/evo/genome.py: ModelGenomeDefinition
  models: [expert-a, expert-b]
  merge_method: ties         # linear | task_arithmetic | ties | dare_ties | slerp
  base_model: base
  layer_granularity: 1       # layers per parameter group (0: one group)
  normalize: null            # null: true for linear, ties, dare_ties
  allow_negative_weights: false
  smooth: false
  filters: [self_attn, mlp]
tasks:                       # mergekit/evo/config.py: TaskConfiguration, with a task file as name
  - name: arith-val.jsonl    # an `mlxmerge eval` task file: perplexity, choice or generation
    weight: 1.0
    held_out: arith-test.jsonl   # mlxmerge: the file the best recipe is re-scored on
limit: null                  # at most this many items of each task in the search
random_init: false
apply_chat_template: false   # mergekit's default is true (lm-eval); mlxmerge eval's is false
```

The search maximizes Σ weight · metric over the tasks' search splits, as mergekit-evolve does
(perplexity-like metrics need a negative weight). A task without ``held_out`` is split: the first
``search_fraction`` of its items (default 0.5) are searched, the rest are held out. mergekit-only
options of lm-eval (``num_fewshot``, ``shuffle``, ``fewshot_as_multiturn``) are refused with a
line saying why; unknown keys are refused with the accepted list.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mlxmerge.errors import RecipeError
from mlxmerge.evolve.genome import GenomeDefinition
from mlxmerge.merge.recipe import _model_ref, _unknown, read_document

TOP_KEYS = (
    "genome", "tasks", "limit", "random_init", "apply_chat_template", "search_fraction",
    "batch_size", "max_tokens", "max_length",
)  # fmt: skip
GENOME_KEYS = (
    "models", "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize",
    "allow_negative_weights", "filters", "smooth",
)  # fmt: skip
TASK_KEYS = ("name", "weight", "metric", "held_out", "extract")
LM_EVAL_ONLY = ("num_fewshot", "shuffle", "fewshot_as_multiturn")
# lm-eval's metric names as mergekit configs write them, and ours
METRIC_ALIASES = {"acc,none": "accuracy", "acc_norm,none": "accuracy_norm",
                  "exact_match,none": "exact_match"}  # fmt: skip
METRICS = {
    "perplexity": ("perplexity", "nll_per_token", "bits_per_byte"),
    "choice": ("accuracy", "accuracy_norm"),
    "generation": ("exact_match",),
}
LOWER_IS_BETTER = ("perplexity", "nll_per_token", "bits_per_byte")


@dataclass(frozen=True)
class TaskSpec:
    """One ``tasks:`` entry."""

    name: str
    """The task file searched on (split when ``held_out`` is None)."""
    weight: float = 1.0
    """Its weight in the score Σ weight · metric."""
    metric: str | None = None
    """A metric of the task's kind; None: its primary one (exact_match, accuracy, perplexity)."""
    held_out: str | None = None
    """The task file the best recipe is re-scored on."""
    extract: str | None = None
    """Generation: the regex whose first match (group 1 if any) is the answer."""


@dataclass(frozen=True)
class EvolveConfig:
    genome: GenomeDefinition
    tasks: tuple[TaskSpec, ...]
    limit: int | None = None
    """At most this many items (documents) of each task in the search split."""
    random_init: bool = False
    """Start CMA-ES from uniform [0, 1) genes (seeded) instead of mergekit's 1/models."""
    apply_chat_template: bool = False
    """Generation: wrap prompts in the tokenizer's chat template."""
    search_fraction: float = 0.5
    """Share of a task searched on when it has no ``held_out`` file."""
    batch_size: int = 16
    max_tokens: int = 32
    """Generation: most tokens per answer."""
    max_length: int = 512
    """Perplexity: window length in tokens."""

    def digest(self) -> str:
        """A hash of the config and of every task file's bytes (a resumed run must match it)."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        for t in self.tasks:
            for f in (t.name, t.held_out):
                if f is not None and Path(f).is_file():
                    h.update(Path(f).read_bytes())
        return h.hexdigest()[:16]


def _bool(raw: dict, key: str, where: str, default):
    v = raw.get(key, default)
    if v is not None and not isinstance(v, bool):
        raise RecipeError(f"{where}: {key} must be true or false, got {v!r}")
    return v


def _int(raw: dict, key: str, where: str, default, low: int):
    v = raw.get(key, default)
    if v is None and default is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise RecipeError(f"{where}: {key} must be a whole number >= {low}, got {v!r}")
    return v


def _genome(raw, where: str) -> GenomeDefinition:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a mapping with models and merge_method")
    _unknown(raw, GENOME_KEYS, where)
    for key in ("models", "merge_method"):
        if key not in raw:
            raise RecipeError(f"{where}: {key} is missing")
    if not isinstance(raw["models"], list) or not raw["models"]:
        raise RecipeError(f"{where}: models must be a non-empty list")
    filters = raw.get("filters") or []
    if not isinstance(filters, list):
        raise RecipeError(f"{where}: filters must be a list of tensor-name substrings")
    base = raw.get("base_model")
    tok = raw.get("tokenizer_source")
    definition = GenomeDefinition(
        models=tuple(_model_ref(m, f"{where}.models[{i}]") for i, m in enumerate(raw["models"])),
        merge_method=str(raw["merge_method"]),
        base_model=_model_ref(base, f"{where}.base_model") if base else None,
        tokenizer_source=str(tok) if tok else None,
        layer_granularity=_int(raw, "layer_granularity", where, 0, 0),
        normalize=_bool(raw, "normalize", where, None),
        allow_negative_weights=_bool(raw, "allow_negative_weights", where, False),
        filters=tuple(filters),
        smooth=_bool(raw, "smooth", where, False),
    )
    definition.check(where)
    return definition


def _task(raw, where: str) -> TaskSpec:
    if isinstance(raw, str):  # mergekit accepts a bare task name
        raw = {"name": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise RecipeError(f"{where}: a task file name or a mapping with name (and weight)")
    _unknown(raw, TASK_KEYS, where)
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight == 0:
        raise RecipeError(f"{where}: weight must be a non-zero number, got {weight!r}")
    metric = raw.get("metric")
    if metric is not None:
        metric = METRIC_ALIASES.get(str(metric), str(metric))
    held = raw.get("held_out")
    if held is not None and not isinstance(held, str):
        raise RecipeError(f"{where}: held_out must be a task file name")
    extract = raw.get("extract")
    return TaskSpec(raw["name"], float(weight), metric, held,
                    None if extract is None else str(extract))  # fmt: skip


def parse_config(source: str | Path | dict) -> EvolveConfig:
    """Read and check a mergekit-evolve config (a path or a dict); raises ``RecipeError``."""
    raw, where = read_document(source, "evolve config", several="; give one config")
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: an evolve config is a YAML mapping with genome and tasks")
    for key in LM_EVAL_ONLY:
        if key in raw:
            raise RecipeError(
                f"{where}: {key!r} is an lm-evaluation-harness option; mlxmerge evolve scores "
                "task files (put few-shot examples into the prompts), remove it"
            )
    _unknown(raw, TOP_KEYS, where)
    for key in ("genome", "tasks"):
        if key not in raw:
            raise RecipeError(f"{where}: {key} is missing")
    if not isinstance(raw["tasks"], list) or not raw["tasks"]:
        raise RecipeError(f"{where}: tasks must be a non-empty list")
    fraction = raw.get("search_fraction", 0.5)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise RecipeError(f"{where}: search_fraction must be between 0 and 1, got {fraction!r}")
    return EvolveConfig(
        genome=_genome(raw["genome"], f"{where}: genome"),
        tasks=tuple(_task(t, f"{where}: tasks[{i}]") for i, t in enumerate(raw["tasks"])),
        limit=_int(raw, "limit", where, None, 1),
        random_init=_bool(raw, "random_init", where, False),
        apply_chat_template=_bool(raw, "apply_chat_template", where, False),
        search_fraction=float(fraction),
        batch_size=_int(raw, "batch_size", where, 16, 1),
        max_tokens=_int(raw, "max_tokens", where, 32, 1),
        max_length=_int(raw, "max_length", where, 512, 2),
    )


def check_metric(spec: TaskSpec, kind: str, where: str) -> str:
    """The metric of ``spec`` for a task of ``kind``, checked (sign of the weight included)."""
    from mlxmerge.eval.scoring import PRIMARY

    metric = spec.metric or PRIMARY[kind]
    if metric not in METRICS[kind]:
        raise RecipeError(
            f"{where}: metric {metric!r} does not apply to a {kind} task; "
            f"accepted: {', '.join(METRICS[kind])}"
        )
    if metric in LOWER_IS_BETTER and spec.weight > 0:
        raise RecipeError(
            f"{where}: {metric} is lower-is-better; give the task a negative weight (the search "
            "maximizes Σ weight · metric, as mergekit-evolve)"
        )
    return metric
