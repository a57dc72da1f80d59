"""Export the edit as an mlx-lm LoRA adapter (rank 1) that stays exact on a quantized base.

``W' x = W x − λ r (rᵀ W x)`` is a rank-1 update, so it is a LoRA with ``lora_a = Wᵀ r`` (d_in, 1)
and ``lora_b = −λ rᵀ`` (1, d_model) at scale 1. ``W`` is the weight as the base stores it,
dequantized if it is quantized, so ``rᵀ W' = 0`` holds for exactly the weights that run; nothing
is re-quantized. Load with ``mlx_lm.load(MODEL, adapter_path=OUT)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmerge.abliterate.architectures import _LAYER, architecture, writer_tensors
from mlxmerge.abliterate.orthogonalize import post_norm_direction, unit
from mlxmerge.errors import MlxmergeError
from mlxmerge.io import open_checkpoint
from mlxmerge.io.output import atomic_folder, check_free_space, check_output


def check_adapter_export(ckpt) -> list:
    """The residual writers a rank-1 adapter edits; ``MlxmergeError`` (from headers only, before
    any forward pass) when one has a bias or is not 2-D (GPT-2's biased writers, stacked experts)."""
    writers = writer_tensors(ckpt.names(), architecture(ckpt.model_type))
    for wt in writers:
        if wt.name.endswith(".bias") or len(ckpt.shape(wt.name)) != 2:
            raise MlxmergeError(
                f"{wt.name}: adapter export handles bias-free 2-D writers only; "
                "export the full model instead (drop --adapter)"
            )
    return writers


def export_adapter(
    model, output: str | Path, direction, *, attn_weights: list[float], mlp_weights: list[float],
    force: bool = False, extra_files: dict[str, str] | None = None,
) -> Path:  # fmt: skip
    """Write ``adapters.safetensors`` and ``adapter_config.json`` for the orthogonalization."""
    ckpt = model if hasattr(model, "entries") else open_checkpoint(model)
    arch = architecture(ckpt.model_type)
    writers = check_adapter_export(ckpt)
    target = check_output(output, [ckpt], force=force)
    directions = np.asarray(direction, dtype=np.float32)
    weights, keys = {}, set()
    for wt in writers:
        lam = attn_weights[wt.layer] if wt.writer.component == "attn" else mlp_weights[wt.layer]
        r = mx.array(directions if directions.ndim == 1 else directions[wt.layer])
        if wt.norm_weight:
            r = post_norm_direction(r, arch.gain_offset + ckpt.get(wt.norm_weight, mx.float32))
        r = unit(r)
        w = ckpt.get(wt.name, mx.float32)  # (d_model, d_in), dequantized as the base runs it
        prefix = wt.name.removesuffix(".weight")
        weights[f"{prefix}.lora_a"] = (r @ w)[:, None]
        weights[f"{prefix}.lora_b"] = (-lam * r)[None, :]
        keys.add(_LAYER.match(wt.name)["module"])
        mx.eval(weights[f"{prefix}.lora_a"], weights[f"{prefix}.lora_b"])
    config = {
        "fine_tune_type": "lora",
        "num_layers": ckpt.num_layers,
        "lora_parameters": {"rank": 1, "scale": 1.0, "dropout": 0.0, "keys": sorted(keys)},
        "mlxmerge": "abliteration: W' = W - lambda r r^T W as a rank-1 LoRA",
    }
    check_free_space(target, sum(w.nbytes for w in weights.values()), "the adapter")
    with atomic_folder(target, force=force) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return target


__all__ = ["check_adapter_export", "export_adapter"]
