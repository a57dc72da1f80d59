"""``base+adapter`` references (mergekit's ``model+lora``): a checkpoint whose tensors are fused
with a LoRA adapter as they are read, ``W + scale · B A`` in float32. Nothing fused goes to disk."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxmerge.errors import CheckpointError
from mlxmerge.io.checkpoint import Checkpoint
from mlxmerge.io.dtypes import FLOAT_DTYPES
from mlxmerge.io.layout import layout_of
from mlxmerge.io.writer import RawTensor
from mlxmerge.lora.adapter import Adapter, is_adapter, open_adapter


def split_reference(reference: str) -> tuple[str, str] | None:
    """``"org/base+path/to/adapter"`` → (base, adapter); None when it is no such reference.

    The split is at the last ``+`` whose right side is an adapter folder (bases may hold ``+``)."""
    ref = str(reference)
    if "+" not in ref or Path(ref).exists():
        return None
    parts = ref.split("+")
    for i in range(len(parts) - 1, 0, -1):
        base, adapter = "+".join(parts[:i]), "+".join(parts[i:])
        if is_adapter(adapter):
            return base, adapter
    base, adapter = ref.rsplit("+", 1)
    if not Path(adapter).expanduser().exists():
        raise CheckpointError(
            f"{ref}: the LoRA adapter {adapter} does not exist (a model+lora reference needs a "
            "local adapter folder)"
        )
    open_adapter(adapter)  # raises with what is missing from the folder
    return base, adapter


@dataclass
class FusedCheckpoint(Checkpoint):
    """``base`` with ``adapter`` fused into each tensor it touches, lazily, on ``get``."""

    adapter: Adapter | None = None
    fused: set[str] = field(default_factory=set)

    def raw(self, name: str) -> RawTensor | None:
        if name in self.fused:
            return None  # the stored bytes are the base's, not the fused tensor's
        return super().raw(name)

    def get(self, name: str, dtype: mx.Dtype | None = None) -> mx.array:
        if name not in self.fused:
            return super().get(name, dtype)
        a = self.adapter
        if name in a.replaced:  # modules_to_save, or PEFT's saved base_layer under a LoRA
            x = a.replacement(name).astype(mx.float32)
        else:
            x = super().get(name, mx.float32)  # quantized bases: dequantized first
        if name in a.weights:
            x = x + a.delta(name)
        return x.astype(dtype or self._stored_float(name))

    def _stored_float(self, name: str) -> mx.Dtype:
        dtype = self.dtype(name)
        return dtype if dtype in FLOAT_DTYPES.values() else mx.float32


def _to_base_names(adapter, base: Checkpoint):
    """PEFT keys follow transformers' module tree (GPT-2: ``transformer.h.0...``); the checkpoint
    is seen under MLX-layout names (``model.h.0...``). Rename what the base lacks and the layout
    maps; anything else is left for the "does not have" error."""
    lay = layout_of(base.model_type)
    if not lay.mlx_prefix:
        return adapter

    def rename(name: str) -> str:
        if name in base:
            return name
        for prefix in lay.hf_prefixes:
            if name.startswith(prefix) and lay.mlx_prefix + name.removeprefix(prefix) in base:
                return lay.mlx_prefix + name.removeprefix(prefix)
        return name

    weights = {
        rename(n): dataclasses.replace(w, name=rename(n)) for n, w in adapter.weights.items()
    }
    replaced = {rename(n): key for n, key in adapter.replaced.items()}
    return dataclasses.replace(adapter, weights=weights, replaced=replaced)


def fuse_checkpoint(base: Checkpoint, adapter_path: str | Path, reference: str) -> FusedCheckpoint:
    """Wrap ``base`` with the adapter at ``adapter_path``; every shape is checked here."""
    adapter = _to_base_names(open_adapter(adapter_path), base)
    for name in list(adapter.weights) + list(adapter.replaced):
        if name not in base:
            raise CheckpointError(
                f"{reference}: the adapter changes {name}, which {base.reference} does not have; "
                "is it an adapter for this base model?"
            )
    for name in adapter.weights:
        if adapter.delta_shape(name) != base.shape(name):
            raise CheckpointError(
                f"{reference}: the adapter's update of {name} is {adapter.delta_shape(name)} but "
                f"the tensor is {base.shape(name)} in {base.reference}"
            )
    for name, key in adapter.replaced.items():
        if adapter.shapes[key] != base.shape(name):
            raise CheckpointError(
                f"{reference}: the adapter's {name} is {adapter.shapes[key]} but "
                f"{base.shape(name)} in {base.reference}"
            )
    fields = {k: getattr(base, k) for k in Checkpoint.__dataclass_fields__}
    fields["reference"] = reference
    return FusedCheckpoint(
        **fields, adapter=adapter, fused=set(adapter.weights) | set(adapter.replaced)
    )


def open_fused(reference: str) -> FusedCheckpoint | None:
    """Open ``base+adapter`` as a fused checkpoint; None when ``reference`` is not one."""
    from mlxmerge.io.checkpoint import open_checkpoint

    parts = split_reference(reference)
    if parts is None:
        return None
    return fuse_checkpoint(open_checkpoint(parts[0]), parts[1], str(reference))


def load_mlx_lm(ckpt: Checkpoint, lazy: bool = False):
    """``(model, tokenizer)`` through mlx-lm, with a fused checkpoint's adapter applied.

    Forward-pass code (eval, abliteration) must not load ``ckpt.path`` alone: for ``base+adapter``
    that is the base without the adapter. mlx-lm adapters load as mlx-lm LoRA layers; PEFT ones
    are fused into the base's float weights as they are read. ``lazy`` leaves the weights
    unevaluated (mlx-lm's ``lazy``), so a caller can cast them as they are read."""
    import mlx_lm
    from mlx.utils import tree_flatten

    from mlxmerge.io.gguf_read import GGUFCheckpoint, load_mlx_lm_gguf
    from mlxmerge.io.rope_config import mlx_lm_overrides

    if isinstance(ckpt, GGUFCheckpoint):  # no safetensors to load: built from its tensors
        return load_mlx_lm_gguf(ckpt)
    # The checkpoint's config (transformers 5's RoPE fields restored), not only the file's.
    fields = mlx_lm_overrides(ckpt.config)
    if not isinstance(ckpt, FusedCheckpoint):
        return mlx_lm.load(str(ckpt.path), model_config=fields, lazy=lazy)
    adapter = ckpt.adapter
    if adapter.format == "mlx":
        return mlx_lm.load(
            str(ckpt.path), adapter_path=str(adapter.path), model_config=fields, lazy=lazy
        )
    model, tokenizer = mlx_lm.load(str(ckpt.path), model_config=fields, lazy=lazy)
    params = dict(tree_flatten(model.parameters()))
    weights = []
    for name in sorted(ckpt.fused):
        if name not in params or ckpt.is_quantized(name):
            raise CheckpointError(
                f"{ckpt.reference}: mlx-lm cannot run the PEFT adapter's {name} on this base "
                f"(quantized or renamed); write the merge first: mlxmerge linear "
                f"'{ckpt.reference}' --weight 1 -o OUT"
            )
        weights.append((name, ckpt.get(name, params[name].dtype)))
    model.load_weights(weights, strict=False)
    if not lazy:
        mx.eval(model.parameters())
    return model, tokenizer
