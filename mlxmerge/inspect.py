"""Describe a checkpoint from its headers and config alone (no tensor data is read)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from mlxmerge.errors import CheckpointError
from mlxmerge.io import Checkpoint, open_checkpoint
from mlxmerge.io.architecture import check_architecture
from mlxmerge.io.checkpoint import natural_key
from mlxmerge.io.dtypes import SAFETENSORS_TO_MX
from mlxmerge.io.finite import count_bytes, is_checked
from mlxmerge.io.safetensors_file import TensorEntry, read_header


def inspect_model(model: str, check: bool = False) -> dict:
    """Architecture, size, dtypes and quantization of ``model``; for a LoRA adapter folder
    (mlx-lm or PEFT), its format, base model, modules, ranks and scales (``kind: adapter``).

    ``check`` also scans every stored float tensor (an adapter's too) for NaN/Inf
    (``scan_nonfinite``).
    """
    from mlxmerge.lora.adapter import is_adapter, open_adapter

    if is_adapter(model):
        adapter = open_adapter(model)
        out = {"kind": "adapter", **adapter.describe()}
        if check:
            out["nonfinite"] = _scan_entries(read_header(adapter.file)[0])
        return out
    ckpt = open_checkpoint(model, check_config=False)
    try:  # described even when broken: the mismatch is one more fact about it
        check_architecture(ckpt)
        mismatch = None
    except CheckpointError as e:
        mismatch = str(e)
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
        "path": str(ckpt.files[0] if hasattr(ckpt, "gguf_type") else ckpt.path),
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
        **({"gguf": _gguf_types(ckpt)} if hasattr(ckpt, "gguf_type") else {}),
        "config_mismatch": mismatch,  # why mlx-lm would refuse its tensors (None: they fit)
        **({"nonfinite": scan_nonfinite(ckpt)} if check else {}),
    }


def _gguf_types(ckpt) -> dict:
    """A GGUF checkpoint's ggml types: counts and each tensor's (its quantization, per tensor)."""
    tensors = {n: ckpt.gguf_type(n) for n in ckpt.names()}
    return {"architecture": ckpt.metadata.get("gguf_architecture"),
            "types": dict(Counter(tensors.values())), "tensors": tensors}  # fmt: skip


def scan_nonfinite(ckpt: Checkpoint, progress=None) -> list[dict]:
    """Every stored float tensor holding NaN or Inf, with counts: ``[{tensor, nan, inf}]``.

    Reads the files through a memory map, a chunk at a time: memory stays flat whatever the
    model size. Quantized weights are checked through their float scales and biases.
    """
    if hasattr(ckpt, "gguf_type"):  # GGUF blocks hold their scales: check the decoded values
        return _scan_decoded(ckpt, progress)
    return _scan_entries(ckpt.entries, progress)


def _scan_decoded(ckpt, progress=None) -> list[dict]:
    found = []
    for name in ckpt.names():
        x = ckpt.numpy(name)  # one tensor at a time
        nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
        if nan or inf:
            found.append({"tensor": name, "nan": nan, "inf": inf})
        if progress:
            progress(name)
    return found


def _scan_entries(entries: dict[str, TensorEntry], progress=None) -> list[dict]:
    found = []
    for name in sorted(entries, key=natural_key):
        e = entries[name]
        dtype = SAFETENSORS_TO_MX.get(e.dtype)
        if dtype is not None and is_checked(dtype):
            nan, inf = count_bytes(e.file, e.data_start + e.begin, e.nbytes, dtype)
            if nan or inf:
                found.append({"tensor": name, "nan": nan, "inf": inf})
        if progress:
            progress(name)
    return found


def _dtype_name(ckpt: Checkpoint, name: str) -> str:
    try:
        return str(ckpt.dtype(name)).removeprefix("mlx.core.")
    except CheckpointError:  # FP8 and the like: describable, though not loadable
        return ckpt.stored_dtype(name)
