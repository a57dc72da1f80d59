"""mergekit-moe's YAML schema (``mergekit/moe/config.py``, mergekit 0.1.5): parse and validate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlxmerge.errors import RecipeError
from mlxmerge.merge.moe_router import GATE_MODES
from mlxmerge.merge.recipe import _model_ref, _unknown, check_dtype, read_document

TOP_KEYS = (
    "base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts",
    "architecture", "tokenizer_source",
)  # fmt: skip
EXPERT_KEYS = (
    "source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale",
)  # fmt: skip


@dataclass
class Expert:
    """One dense model whose MLPs become an expert (or the shared expert) at every layer."""

    source_model: str
    positive_prompts: list[str] = field(default_factory=list)  # routed to this expert
    negative_prompts: list[str] = field(default_factory=list)  # routed away from it
    noise_scale: float | None = None  # std of Gaussian noise added to its MLP weights
    residual_scale: float | None = None  # multiplies its down_proj (its residual write)


@dataclass
class MoEConfig:
    """A mixture of experts: attention and embeddings of ``base_model``, one expert per entry."""

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"  # hidden | cheap_embed | random | uniform_random
    dtype: str | None = None  # output dtype; default: the base's, else bfloat16
    experts_per_token: int = 2
    shared_experts: list[Expert] = field(default_factory=list)  # Qwen2-MoE's always-on expert
    architecture: str | None = None  # output name prefix: mixtral, qwen, qwen3
    raw: dict = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        refs = [self.base_model] + [e.source_model for e in self.experts + self.shared_experts]
        return list(dict.fromkeys(refs))


def _prompts(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise RecipeError(f"{where}: expected a list of prompt strings")
    return list(value)


def _number(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _expert(raw, where: str) -> Expert:
    if isinstance(raw, str):
        raw = {"source_model": raw}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping with source_model")
    _unknown(raw, EXPERT_KEYS, where)
    if "source_model" not in raw:
        raise RecipeError(f"{where}: source_model is missing")
    return Expert(
        _model_ref(raw["source_model"], where),
        _prompts(raw.get("positive_prompts"), f"{where}: positive_prompts"),
        _prompts(raw.get("negative_prompts"), f"{where}: negative_prompts"),
        _number(raw.get("noise_scale"), f"{where}: noise_scale"),
        _number(raw.get("residual_scale"), f"{where}: residual_scale"),
    )


def parse_moe_config(source: str | Path | dict | MoEConfig) -> MoEConfig:
    """Read a mergekit-moe config (path or dict) and check what needs no model."""
    if isinstance(source, MoEConfig):
        return source
    raw, where = read_document(source, "moe config", several="; a MoE config is one")
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a MoE config is a YAML mapping with base_model and experts")
    _unknown(raw, TOP_KEYS, where)
    if raw.get("tokenizer_source") not in (None, "base"):
        raise RecipeError(f"{where}: tokenizer_source: only 'base' is supported for MoE outputs")
    if not raw.get("base_model"):
        raise RecipeError(f"{where}: base_model is missing")
    experts = raw.get("experts")
    if not isinstance(experts, list) or not experts:
        raise RecipeError(f"{where}: experts must be a non-empty list")
    shared = raw.get("shared_experts") or []
    if not isinstance(shared, list):
        raise RecipeError(f"{where}: shared_experts must be a list")
    k = raw.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RecipeError(f"{where}: experts_per_token must be an integer >= 1, got {k!r}")
    mode = raw.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise RecipeError(f"{where}: unknown gate_mode {mode!r}; accepted: {', '.join(GATE_MODES)}")
    cfg = MoEConfig(
        base_model=_model_ref(raw["base_model"], f"{where}: base_model"),
        experts=[_expert(e, f"{where}: experts[{i}]") for i, e in enumerate(experts)],
        gate_mode=mode,
        dtype=check_dtype(raw.get("dtype"), f"{where}: dtype"),
        experts_per_token=k,
        shared_experts=[_expert(e, f"{where}: shared_experts[{i}]") for i, e in enumerate(shared)],
        architecture=raw.get("architecture"),
        raw=dict(raw),
    )
    check_prompts(cfg, where)
    return cfg


def check_prompts(cfg: MoEConfig, where: str) -> None:
    """mergekit's ``is_bad_config``: the checks that need no model."""
    if len(cfg.experts) < cfg.experts_per_token:
        raise RecipeError(
            f"{where}: {len(cfg.experts)} experts but experts_per_token is "
            f"{cfg.experts_per_token}; give at least as many experts as experts_per_token"
        )
    if cfg.gate_mode in ("random", "uniform_random"):
        return
    for i, e in enumerate(cfg.experts):
        if not e.positive_prompts:
            raise RecipeError(
                f"{where}: experts[{i}] ({e.source_model}) has no positive_prompts, which "
                f"gate_mode {cfg.gate_mode} needs (or use gate_mode: random)"
            )
    with_prompts = [bool(e.positive_prompts) for e in cfg.shared_experts]
    if any(with_prompts) and not all(with_prompts):
        raise RecipeError(f"{where}: give positive_prompts to every shared expert or to none")
    first = (cfg.experts[0].positive_prompts, cfg.experts[0].negative_prompts)
    if len(cfg.experts) > 1 and all(
        (e.positive_prompts, e.negative_prompts) == first for e in cfg.experts[1:]
    ):
        raise RecipeError(
            f"{where}: every expert has the same prompts, so the router cannot tell them apart; "
            "give each expert prompts of what should be routed to it"
        )
