"""Write extracted LoRA factors as an mlx-lm or a PEFT adapter folder (see ``adapter.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from mlxmerge.io.layout import layout_of
from mlxmerge.lora.adapter import CONFIG, MLX_WEIGHTS, PEFT_PREFIX, PEFT_WEIGHTS

FORMATS = ("mlx", "peft")


def layer_relative(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``self_attn.q_proj`` (mlx-lm's per-layer LoRA keys)."""
    m = re.match(r"^.*?\.(?:layers|h|blocks)\.\d+\.(.+)$", module)
    return m.group(1) if m else module


def write_mlx_adapter(
    folder: Path, factors: dict[str, tuple[mx.array, mx.array]], *, num_layers: int,
    base_model: str, dtype: mx.Dtype = mx.float32,
) -> None:  # fmt: skip
    """``factors``: module → (b (out, r), a (r, in)) with ``ΔW = b @ a``; scale 1.

    mlx-lm has one rank per adapter: smaller ranks are zero-padded to the largest (zero columns
    add nothing), so the adapter computes exactly the extracted ``b @ a``."""
    rank = max(b.shape[1] for b, _ in factors.values())
    weights = {}
    for module, (b, a) in factors.items():
        pad = rank - b.shape[1]
        weights[f"{module}.lora_a"] = mx.pad(a.T, [(0, 0), (0, pad)]).astype(dtype)  # (in, rank)
        weights[f"{module}.lora_b"] = mx.pad(b.T, [(0, pad), (0, 0)]).astype(dtype)  # (rank, out)
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": rank, "scale": 1.0, "dropout": 0.0,
            "keys": sorted({layer_relative(m) for m in factors}),
        },
        "model": base_model,
    }  # fmt: skip
    mx.save_safetensors(str(folder / MLX_WEIGHTS), weights, metadata={"format": "mlx"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2))


def peft_module(name: str, model_type: str | None) -> str:
    """The transformers module path of an MLX-layout name (PEFT keys follow transformers' model).

    GPT-2: mlx-lm's ``model.h.0.attn.c_attn`` is ``transformer.h.0.attn.c_attn``; every other
    layout mlxmerge knows keeps its names."""
    lay = layout_of(model_type)
    if lay.mlx_prefix and lay.hf_prefixes and name.startswith(lay.mlx_prefix):
        return lay.hf_prefixes[0] + name.removeprefix(lay.mlx_prefix)
    return name


def write_peft_adapter(
    folder: Path, factors: dict[str, tuple[mx.array, mx.array]], *, base_model: str,
    full: dict[str, mx.array] | None = None, dtype: mx.Dtype = mx.float32,
    model_type: str | None = None,
) -> None:  # fmt: skip
    """PEFT LoRA: ``lora_A`` (r, in), ``lora_B`` (out, r), ``lora_alpha = r`` (scale 1).

    Modules whose rank differs from the most common one get ``rank_pattern``/``alpha_pattern``
    entries; ``full`` tensors (embeddings, ``lm_head``) are written whole as ``modules_to_save``.
    Names are transformers' for ``model_type`` (``peft_module``); for GPT-2's Conv1D layers
    ``fan_in_fan_out`` is true, as PEFT itself records it (the factors are the same: PEFT's
    Conv1D LoRA computes ``x Aᵀ Bᵀ`` too)."""
    factors = {peft_module(m, model_type): f for m, f in factors.items()}
    full = {peft_module(n, model_type): x for n, x in (full or {}).items()}
    ranks = {m: b.shape[1] for m, (b, _) in factors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    weights = {}
    for module, (b, a) in factors.items():
        weights[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.astype(dtype)
        weights[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.astype(dtype)
    for name, x in (full or {}).items():
        weights[f"{PEFT_PREFIX}{name}"] = x.astype(dtype)
    pattern = {m: k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": bool(layout_of(model_type).transposed), "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
        "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "modules_to_save": sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in full})
        if full else None,
    }  # fmt: skip
    mx.save_safetensors(str(folder / PEFT_WEIGHTS), weights, metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
