"""A sparse mixture of experts from dense fine-tunes of one base (mergekit-moe).

Each expert's MLP becomes an expert at every layer; attention, norms and embeddings come from the
base; a router row per expert is initialised from prompts (see ``moe_router``). The output is a
Mixtral model for Llama/Mistral bases, Qwen2-MoE when one shared expert is given, Qwen3-MoE for
Qwen3 bases, the way mergekit 0.1.5 (``mergekit/scripts/moe.py``) chooses. Tensors stream one at a
time through the model writer; stacked expert tensors are mlx-lm's ``switch_mlp`` (MLX layout) or
split per expert with transformers' names (HF layout).
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import yaml

from mlxmerge.errors import RecipeError
from mlxmerge.io import Checkpoint, ModelCard, open_checkpoint, parse_size, write_model
from mlxmerge.io.checkpoint import natural_key
from mlxmerge.io.dtypes import FLOAT_NAMES, parse_float_dtype
from mlxmerge.io.hub import is_hub_reference
from mlxmerge.io.model_folder import source_name
from mlxmerge.io.output import check_output
from mlxmerge.io.writer import RawTensor
from mlxmerge.merge.methods.sparsify import derive_key
from mlxmerge.merge.moe_config import Expert, MoEConfig, parse_moe_config
from mlxmerge.merge.moe_router import (
    cheap_embed_gates,
    hidden_gates,
    last_token_layer_inputs,
    prompt_tokens,
    random_gates,
    warn_degenerate,
)

__all__ = ["MoEConfig", "MoEPlan", "moe", "parse_moe_config", "plan_moe"]

log = logging.getLogger(__name__)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class OutputArch:
    """One MoE output architecture (mergekit's ``MoEOutputArchitecture``), as data."""

    name: str  # mergekit's name; the config's ``architecture`` matches a prefix of it
    model_type: str
    architectures: tuple[str, ...]
    inputs: tuple[str, ...]  # base model types it accepts
    shared_experts: int  # how many shared experts it needs
    block: str  # the MoE module under each layer
    config: dict = field(default_factory=dict)  # keys set on the base's config
    untied: bool = False  # mlx-lm's class always has an lm_head (tied embeddings get copied)


# mergekit's order; Mixtral wins whenever it fits (its rule, kept for old configs).
ARCHITECTURES = (
    OutputArch("Mixtral", "mixtral", ("MixtralForCausalLM",), ("llama", "mistral"), 0,
               "block_sparse_moe", {"sliding_window": None}),
    OutputArch("Qwen MoE", "qwen2_moe", ("Qwen2MoeForCausalLM",), ("llama", "mistral", "qwen2"),
               1, "mlp", {"decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": [],
                          "sliding_window": None, "use_sliding_window": False}, untied=True),
    OutputArch("Qwen3 MoE", "qwen3_moe", ("Qwen3MoeForCausalLM",), ("qwen3",), 0, "mlp",
               {"decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": []}),
)  # fmt: skip


def select_architecture(cfg: MoEConfig, base_type: str | None, where: str) -> OutputArch:
    """mergekit's ``select_output_arch``: filter by ``architecture``, then by what fits."""
    candidates = [
        a
        for a in ARCHITECTURES
        if not cfg.architecture or a.name.lower().startswith(str(cfg.architecture).lower())
    ]
    if not candidates:
        names = ", ".join(a.name for a in ARCHITECTURES)
        raise RecipeError(f"{where}: no output architecture {cfg.architecture!r}; have: {names}")
    fits = [
        a
        for a in candidates
        if base_type in a.inputs and len(cfg.shared_experts) == a.shared_experts
    ]
    if not fits:
        options = "; ".join(
            f"{a.name} takes {'/'.join(a.inputs)} models with {a.shared_experts} shared experts"
            for a in candidates
        )
        raise RecipeError(
            f"{where}: no MoE architecture for a {base_type} base with "
            f"{len(cfg.shared_experts)} shared experts ({options})"
        )
    random = cfg.gate_mode in ("random", "uniform_random")
    if not random and not all(e.positive_prompts for e in cfg.shared_experts):
        raise RecipeError(f"{where}: {fits[0].name} needs positive_prompts on the shared expert")
    return fits[0]


def mlp_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


@dataclass
class MoEPlan:
    """Everything checked; what ``moe`` writes. Gates are computed only when writing."""

    config: MoEConfig
    arch: OutputArch
    base: Checkpoint
    experts: list[Checkpoint]  # routed experts, then shared ones, in config order
    tensors: list[tuple[str, tuple[int, ...]]]  # MLX-layout output plan
    out_config: dict
    dtype: mx.Dtype

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    @property
    def n_routed(self) -> int:
        return len(self.config.experts)


def _check_expert(base: Checkpoint, ck: Checkpoint, e: Expert, where: str) -> None:
    if ck.model_type != base.model_type:
        raise RecipeError(
            f"{where}: expert {e.source_model} is a {ck.model_type} model but the base "
            f"{base.reference} is {base.model_type}; experts must share the base's architecture"
        )
    if ck.num_layers != base.num_layers:
        raise RecipeError(
            f"{where}: expert {e.source_model} has {ck.num_layers} layers, the base "
            f"{base.num_layers}; experts must share the base's architecture"
        )
    for layer in range(base.num_layers):
        for proj in PROJECTIONS:
            name = mlp_name(layer, proj)
            if name not in ck:
                raise RecipeError(f"{where}: expert {e.source_model} has no tensor {name}")
            if ck.shape(name) != base.shape(name):
                raise RecipeError(
                    f"{where}: tensor {name} is {ck.shape(name)} in {e.source_model} but "
                    f"{base.shape(name)} in the base; experts must share the base's shapes"
                )


def _out_config(base: Checkpoint, arch: OutputArch, cfg: MoEConfig, where: str) -> dict:
    c = copy.deepcopy(base.config)
    if "text_config" in c and "num_hidden_layers" not in c:
        raise RecipeError(f"{where}: multimodal base models are not supported")
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    if arch.model_type == "mixtral":
        # mlx-lm's Mixtral has no attention/MLP biases and derives head_dim from the hidden size.
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise RecipeError(f"{where}: Mixtral output cannot hold the base's bias terms")
        if c.get("head_dim") not in (None, hidden // heads):
            raise RecipeError(f"{where}: Mixtral output needs head_dim = hidden/heads")
    if "rope_theta" not in c:
        # Keep the base's default rope_theta (Mixtral's default is 1e6, Llama's 1e4).
        module = importlib.import_module(f"mlx_lm.models.{base.model_type}")
        default = module.ModelArgs.__dataclass_fields__.get("rope_theta")
        if default is not None and isinstance(default.default, float):
            c["rope_theta"] = default.default
    n = len(cfg.experts)
    c.update(arch.config)
    c["model_type"] = arch.model_type
    c["architectures"] = list(arch.architectures)
    c["num_experts_per_tok"] = cfg.experts_per_token
    if arch.model_type == "mixtral":
        c["num_local_experts"] = n
    else:
        c["num_experts"] = n
        c["moe_intermediate_size"] = c["intermediate_size"]
        if arch.shared_experts:
            c["shared_expert_intermediate_size"] = c["intermediate_size"]
    if n & (n - 1):
        log.warning("%d experts is not a power of two; llama.cpp cannot run the model", n)
    return c


def _plan_tensors(base: Checkpoint, arch: OutputArch, n_experts: int) -> list:
    tensors = []
    for name in base.names():
        if ".mlp." in name:
            if not any(name.endswith(f".mlp.{p}.weight") for p in PROJECTIONS):
                raise RecipeError(f"{base.reference}: {name}: MLP biases cannot go into experts")
            continue
        tensors.append((name, base.shape(name)))
    if arch.untied and "lm_head.weight" not in base:
        tensors.append(("lm_head.weight", base.shape("model.embed_tokens.weight")))
    hidden = base.config_value("hidden_size")
    for layer in range(base.num_layers):
        prefix = f"model.layers.{layer}.{arch.block}"
        tensors.append((f"{prefix}.gate.weight", (n_experts, hidden)))
        for proj in PROJECTIONS:
            shape = base.shape(mlp_name(layer, proj))
            tensors.append((f"{prefix}.switch_mlp.{proj}.weight", (n_experts, *shape)))
        if arch.shared_experts:
            for proj in PROJECTIONS:
                shape = base.shape(mlp_name(layer, proj))
                tensors.append((f"{prefix}.shared_expert.{proj}.weight", shape))
            tensors.append((f"{prefix}.shared_expert_gate.weight", (1, hidden)))
        if arch.model_type == "qwen2_moe":  # its attention always has q/k/v biases
            for proj in ("q_proj", "k_proj", "v_proj"):
                name = f"model.layers.{layer}.self_attn.{proj}"
                if f"{name}.bias" not in base:
                    tensors.append((f"{name}.bias", base.shape(f"{name}.weight")[:1]))
    return sorted(tensors, key=lambda t: natural_key(t[0]))


def plan_moe(config: MoEConfig | str | Path | dict, *, allow_all_same: bool = False) -> MoEPlan:
    """Parse and check everything (configs and headers only; no tensor is read)."""
    where = str(config) if isinstance(config, (str, Path)) else "moe config"
    cfg = parse_moe_config(config)
    base = open_checkpoint(cfg.base_model)
    arch = select_architecture(cfg, base.model_type, where)
    sources = {e.source_model for e in cfg.experts}
    if not allow_all_same and len(cfg.experts) > 1 and len(sources) == 1:
        raise RecipeError(
            f"{where}: every expert is {cfg.experts[0].source_model}; the MoE would compute "
            "what that model does at more cost (allow_all_same / "
            "--i-understand-this-is-not-useful-without-training to build it anyway)"
        )
    opened: dict[str, Checkpoint] = {cfg.base_model: base}
    experts = []
    for e in cfg.experts + cfg.shared_experts:
        if e.source_model not in opened:
            opened[e.source_model] = open_checkpoint(e.source_model)
        _check_expert(base, opened[e.source_model], e, where)
        experts.append(opened[e.source_model])
    if cfg.gate_mode == "cheap_embed" and "model.embed_tokens.weight" not in base:
        raise RecipeError(f"{where}: gate_mode cheap_embed needs model.embed_tokens.weight")
    base_dtype = base.config_value("torch_dtype") or base.config_value("dtype")
    dtype = parse_float_dtype(cfg.dtype or base_dtype or "bfloat16")
    out_config = _out_config(base, arch, cfg, where)
    tensors = _plan_tensors(base, arch, len(cfg.experts))
    log.info("output architecture: %s, %d experts, %d tensors", arch.name, len(cfg.experts),
             len(tensors))  # fmt: skip
    return MoEPlan(cfg, arch, base, experts, tensors, out_config, dtype)


def compute_gates(plan: MoEPlan, seed: int = 0, batch_size: int = 32) -> np.ndarray:
    """Router rows ``(n_layers, n_routed + n_shared, hidden)`` for the plan's gate_mode."""
    cfg = plan.config
    gated = cfg.experts + cfg.shared_experts
    hidden = plan.base.config_value("hidden_size")
    if cfg.gate_mode in ("random", "uniform_random"):
        return random_gates(cfg.gate_mode, plan.num_layers, len(gated), hidden, seed)
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(plan.base.path)
    groups = [(prompt_tokens(tokenizer, e.positive_prompts),
               prompt_tokens(tokenizer, e.negative_prompts)) for e in gated]  # fmt: skip
    if any(not t for pos, neg in groups for t in pos + neg):
        raise RecipeError("a prompt tokenizes to no tokens (and the tokenizer has no BOS token)")
    if cfg.gate_mode == "cheap_embed":
        embed = np.array(plan.base.get("model.embed_tokens.weight", mx.float32))
        gates = cheap_embed_gates(embed, groups, plan.num_layers)
    else:
        from mlxmerge.lm.load import load

        # Every expert's prompts in one batched pass: one list, indices per expert.
        flat, index = [], []
        for pos, neg in groups:
            index.append((range(len(flat), len(flat) + len(pos)),
                          range(len(flat) + len(pos), len(flat) + len(pos) + len(neg))))  # fmt: skip
            flat += pos + neg
        model, _ = load(plan.base, verb="moe")  # the checkpoint: BASE+ADAPTER fused, not its folder
        states = last_token_layer_inputs(model, flat, batch_size)
        del model
        gates = hidden_gates(states, index)
    warn_degenerate(gates)
    return gates


def _expert_tensor(plan: MoEPlan, e: int, layer: int, proj: str, seed: int) -> mx.array:
    spec = (plan.config.experts + plan.config.shared_experts)[e]
    name = mlp_name(layer, proj)
    x = plan.experts[e].get(name, mx.float32)
    if spec.noise_scale is not None:  # mergekit's noise_and_scale, reproducible per tensor
        x = x + spec.noise_scale * mx.random.normal(x.shape, key=derive_key(seed, name, e))
    if proj == "down_proj" and spec.residual_scale is not None:
        x = x * spec.residual_scale
    return x


def _tensor_fn(plan: MoEPlan, gates: np.ndarray, seed: int) -> Callable:
    block = plan.arch.block
    n = plan.n_routed

    def compute(name: str) -> mx.array | RawTensor:
        parts = name.split(".")
        if name in plan.base:
            return plan.base.raw(name) or plan.base.get(name)
        if name == "lm_head.weight":  # the base ties it to the embeddings
            return compute("model.embed_tokens.weight")
        layer = int(parts[2])
        rest = ".".join(parts[3:])
        if rest == f"{block}.gate.weight":
            return mx.array(gates[layer, :n])
        if rest == f"{block}.shared_expert_gate.weight":
            return mx.array(gates[layer, n : n + 1])
        if rest.startswith(f"{block}.switch_mlp."):
            proj = parts[-2]
            return mx.stack([_expert_tensor(plan, e, layer, proj, seed) for e in range(n)])
        if rest.startswith(f"{block}.shared_expert."):
            return _expert_tensor(plan, n, layer, parts[-2], seed)
        if rest.startswith("self_attn.") and rest.endswith("_proj.bias"):
            return mx.zeros(dict(plan.tensors)[name])  # qwen2_moe's biases absent from the base
        raise AssertionError(f"unplanned tensor {name}")

    return compute


def _card(plan: MoEPlan) -> ModelCard:
    cfg = plan.config
    experts = "\n".join(f"* {source_name(e.source_model)}" for e in cfg.experts)
    shared = "".join(f"\n* {source_name(e.source_model)} (shared)" for e in cfg.shared_experts)
    body = (
        "A mixture of experts built with [mlxmerge](https://github.com/mlxmerge/mlxmerge) "
        f"(mergekit-moe's config).\n\nArchitecture: {plan.arch.name}; base model: "
        f"{source_name(cfg.base_model)}; gate mode: `{cfg.gate_mode}`; {cfg.experts_per_token} experts per "
        f"token.\n\n## Experts\n\n{experts}{shared}\n"
    )
    hub = [m for m in cfg.models if is_hub_reference(m)]
    return ModelCard(f"{plan.arch.name} mixture of experts", body, hub, ["mlxmerge", "moe"])


def moe(
    config: MoEPlan | MoEConfig | str | Path | dict,
    output: str | Path,
    *,
    layout: str = "mlx",
    shard_size: str | int = "5GB",
    seed: int = 0,
    allow_all_same: bool = False,
    batch_size: int = 32,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    gguf_type: str | None = None,
) -> Path:
    """Build a mixture of experts from a mergekit-moe config and write it to ``output``.

    ``seed`` drives ``random`` gates and ``noise_scale``. Raises ``RecipeError`` for configs that
    cannot work (checked before any tensor is read) and ``OutputError`` for a bad output folder.
    """
    plan = (
        config if isinstance(config, MoEPlan) else plan_moe(config, allow_all_same=allow_all_same)
    )
    cfg = plan.config
    check_output(output, cfg.models, force=force)  # before the forward pass
    gates = compute_gates(plan, seed, batch_size)
    raw_yaml = yaml.safe_dump(cfg.raw or {"base_model": cfg.base_model}, sort_keys=False)
    out_config = dict(plan.out_config, torch_dtype=FLOAT_NAMES[plan.dtype])
    return write_model(
        output, plan.tensors, _tensor_fn(plan, gates, seed), config=out_config,
        tokenizer_source=plan.base.path, card=_card(plan), dtype=plan.dtype, layout=layout,
        shard_size=parse_size(shard_size), extra_files={"mlxmerge_moe_config.yml": raw_yaml},
        inputs=cfg.models, force=force, progress=progress, gguf_type=gguf_type,
    )  # fmt: skip
