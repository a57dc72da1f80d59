"""Dtype names: safetensors, MLX, and the names users and configs write."""

from __future__ import annotations

import mlx.core as mx

from mlxmerge.errors import MlxmergeError

# What mx.load reads faithfully: it refuses F64 and F8_E5M2, and hands F8_E4M3 back as raw uint8.
SAFETENSORS_TO_MX = {
    "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16,
    "I64": mx.int64, "I32": mx.int32, "I16": mx.int16, "I8": mx.int8,
    "U64": mx.uint64, "U32": mx.uint32, "U16": mx.uint16, "U8": mx.uint8, "BOOL": mx.bool_,
}  # fmt: skip
MX_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_MX.items()}

# Output dtypes a user may ask for, with the spellings of mergekit and torch.
FLOAT_DTYPES = {
    "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
    "float16": mx.float16, "fp16": mx.float16, "half": mx.float16,
    "float32": mx.float32, "fp32": mx.float32, "float": mx.float32,
}  # fmt: skip

FLOAT_NAMES = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32"}


def parse_float_dtype(name: str) -> mx.Dtype:
    """``"bf16"`` → ``mx.bfloat16``; a clear error for anything else.

    ``torch.bfloat16`` is accepted too: mergekit's ``dtype_from_name`` strips the prefix, and
    config.json files (``torch_dtype``) and recipes copied from them carry it."""
    key = str(name).lower().removeprefix("torch.")
    try:
        return FLOAT_DTYPES[key]
    except KeyError:
        raise MlxmergeError(
            f"unknown dtype {name!r}; use one of bfloat16, float16, float32"
        ) from None


def is_float(dtype: mx.Dtype) -> bool:
    return dtype in (mx.float32, mx.float16, mx.bfloat16, mx.float64)
