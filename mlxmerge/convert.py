"""Convert a checkpoint between dtypes, layouts and quantization: the I/O path end to end."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from mlxmerge.io import ModelCard, Quantization, open_checkpoint, parse_size, write_model
from mlxmerge.io.dtypes import parse_float_dtype
from mlxmerge.io.finite import FiniteGuard
from mlxmerge.io.hub import is_hub_reference
from mlxmerge.io.model_folder import quantizable, source_name

log = logging.getLogger(__name__)


def convert(
    model: str,
    output: str | Path,
    *,
    dtype: str = "bfloat16",
    layout: str = "mlx",
    quantize_bits: int | None = None,
    group_size: int = 64,
    shard_size: str | int = "5GB",
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    allow_nonfinite: bool = False,
    gguf_type: str | None = None,
) -> Path:
    """Rewrite ``model`` into ``output``: dequantized inputs, optional MLX quantization.

    ``layout="gguf"`` writes one GGUF file of ``gguf_type`` (f32, f16, bf16, q8_0, q4_0, q4_1,
    q5_0, q5_1; default q8_0) that llama.cpp runs.

    Raises ``NonFiniteError`` naming the tensor when an input or output tensor holds NaN or
    Inf (an output can overflow when casting to float16), unless ``allow_nonfinite``.
    """
    ckpt = open_checkpoint(model)
    out_dtype = parse_float_dtype(dtype)
    quant = Quantization(bits=quantize_bits, group_size=group_size) if quantize_bits else None
    plan = [(n, ckpt.shape(n)) for n in ckpt.names()]
    card = ModelCard(
        title=f"{Path(str(model)).name} ({dtype}{f', {quantize_bits}-bit' if quant else ''})",
        body=f"Converted from `{source_name(model)}` with `mlxmerge convert`.",
        base_models=[str(model)] if is_hub_reference(model) else [],
    )
    guard = FiniteGuard(allow_nonfinite, "convert")

    # GGUF Q4_0/Q4_1/Q8_0 blocks are MLX affine quantization at group size 32: carried over.
    carried: set[str] = set()
    if quant and layout == "mlx":
        from mlxmerge.io.gguf_read import carried_tensors

        shapes = dict(plan)
        carried = {n for n in carried_tensors(ckpt, quant.bits, quant.group_size)
                   if quantizable(n, shapes[n], quant.group_size)}  # fmt: skip
    if carried:
        note = (f"{len(carried)} GGUF tensors' blocks carried into MLX {quant.bits}-bit "
                "quantization without a float round trip; the other quantized weights went "
                "through mx.quantize.")  # fmt: skip
        log.info(note)
        card.body += f" {note}"

    def compute(name: str):
        if name in carried:
            return ckpt.mlx_blocks(name, quant.bits, quant.group_size)
        raw = ckpt.raw(name)
        return raw if raw is not None else guard.watch(str(model), name, ckpt.get(name))

    # No math here, so no float32 detour: casting straight to the output dtype rounds
    # identically (bit-exact for bf16/fp16/fp32) and halves the time spent casting; tensors
    # already in the output dtype are copied as bytes (a kernel copy, no trip through memory).
    return write_model(
        output, plan, compute, config=ckpt.config,
        tokenizer_source=ckpt.path, card=card, dtype=out_dtype, layout=layout, quantize=quant,
        shard_size=parse_size(shard_size), inputs=[model], force=force, progress=progress,
        guard=guard, gguf_type=gguf_type,
    )  # fmt: skip
