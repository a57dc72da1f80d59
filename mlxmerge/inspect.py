"""Describe a checkpoint from its headers and config alone (no tensor data is read)."""

from __future__ import annotations

from collections import Counter

from mlxmerge.errors import CheckpointError
from mlxmerge.io import Checkpoint, open_checkpoint


def inspect_model(model: str) -> dict:
    """Architecture, size, dtypes and quantization of ``model``."""
    ckpt = open_checkpoint(model)
    names = ckpt.names()
    dtypes = Counter(_dtype_name(ckpt, n) for n in names)
    quantized = [n for n in names if ckpt.is_quantized(n)]
    quant = None
    if quantized:
        p = ckpt.quant_params(quantized[0])
        quant = {"bits": p["bits"], "group_size": p["group_size"], "mode": p["mode"],
                 "quantized_tensors": len(quantized)}  # fmt: skip
    hidden_field, hidden = ckpt.config_field("hidden_size")
    return {
        "path": str(ckpt.path),
        "architecture": (ckpt.config_value("architectures") or [None])[0],
        "model_type": ckpt.model_type,
        "layers": ckpt.num_layers,
        "hidden_size": hidden,
        "hidden_size_field": hidden_field,  # the config key it came from (GPT-2: n_embd)
        "vocab_size": ckpt.config_value("vocab_size"),
        "parameters": sum(ckpt.numel(n) for n in names),
        "tensors": len(names),
        "dtypes": dict(dtypes),
        "quantization": quant,
        "tied_embeddings": ckpt.tie_word_embeddings,
        "shards": len(ckpt.files),
        "size_on_disk": ckpt.size_on_disk,
        "format": ckpt.metadata.get("format"),
    }


def _dtype_name(ckpt: Checkpoint, name: str) -> str:
    try:
        return str(ckpt.dtype(name)).removeprefix("mlx.core.")
    except CheckpointError:  # FP8 and the like: describable, though not loadable
        return ckpt.stored_dtype(name)
