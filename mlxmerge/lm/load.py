"""Load an mlx-lm model after mlxmerge's checks, and read facts about a loaded model."""

from __future__ import annotations

import importlib
import os

from mlx import nn

from mlxmerge.errors import MlxmergeError
from mlxmerge.io import Checkpoint, open_checkpoint
from mlxmerge.lm.compute import to_compute_dtype


def load(
    reference: str | os.PathLike | Checkpoint, *, adapter_path: str | os.PathLike | None = None,
    verb: str = "this command",
):  # fmt: skip
    """``(model, tokenizer)`` through ``mlx_lm.load``, after validating the checkpoint's headers.

    ``reference`` is anything ``open_checkpoint`` takes (or an opened checkpoint), including
    mergekit's ``base+adapter``, which loads with the adapter applied. MLX-quantized folders load
    as they are (mlx-lm reads ``quantization`` from config.json); ``adapter_path`` applies a LoRA
    adapter folder. Raises ``CheckpointError`` for a folder that is not a model,
    ``MlxmergeError`` for an architecture mlx-lm lacks and ``NonFiniteError`` naming the first
    parameter that holds NaN/Inf (a bit test of the loaded buffers, no second read of the files).
    Weights are cast to the compute dtype as they are read (``lm.compute``: float32 on a CPU).
    """
    import mlx_lm

    from mlxmerge.lora.fused import load_mlx_lm

    ckpt = reference if isinstance(reference, Checkpoint) else open_checkpoint(reference)
    check_supported(ckpt.model_type, verb)
    from mlxmerge.io.gguf_read import GGUFCheckpoint, load_mlx_lm_gguf
    from mlxmerge.io.rope_config import mlx_lm_overrides

    if adapter_path and isinstance(ckpt, GGUFCheckpoint):
        model, tokenizer = load_mlx_lm_gguf(ckpt, adapter_path)
    elif adapter_path:
        model, tokenizer = mlx_lm.load(
            str(ckpt.path),
            adapter_path=str(adapter_path),
            model_config=mlx_lm_overrides(ckpt.config),
            lazy=True,
        )
    else:
        model, tokenizer = load_mlx_lm(ckpt, lazy=True)
    to_compute_dtype(model, label=str(ckpt.reference))  # lazy: check_finite reads each cast once
    check_finite(model, str(ckpt.reference), verb)
    return model, tokenizer


def check_finite(model: nn.Module, name: str, verb: str) -> None:
    """One line naming the first parameter of ``model`` that holds NaN or Inf (issue: a broken
    upload makes every forward pass garbage, and nothing else would say why)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxmerge.io.finite import FiniteGuard

    guard = FiniteGuard(False, verb, hint=f"; {verb} cannot run on it (mlxmerge inspect --check)")
    for key, x in tree_flatten(model.parameters()):
        mx.eval(x)
        guard.check_input(name, key, x)


def check_supported(model_type: str | None, verb: str) -> None:
    """One line, before any work, when mlx-lm has no implementation of ``model_type``."""
    if not model_type:
        raise MlxmergeError(f"{verb}: config.json names no model_type; mlx-lm cannot run it")
    from mlx_lm.utils import MODEL_REMAPPING

    name = MODEL_REMAPPING.get(model_type, model_type)
    try:
        importlib.import_module(f"mlx_lm.models.{name}")
    except ImportError:
        raise MlxmergeError(
            f"{verb} does not support model_type {model_type!r}: mlx-lm has no such architecture"
        ) from None


def model_type(model: nn.Module) -> str:
    args = getattr(model, "args", None)
    return str(getattr(model, "model_type", None) or getattr(args, "model_type", "unknown"))


def hidden_size(model: nn.Module) -> int | None:
    """Width of the residual stream from the model's arguments (GPT-2 calls it ``n_embd``)."""
    args = getattr(model, "args", None)
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(args, key, None)
        if isinstance(value, int):
            return value
    return None
