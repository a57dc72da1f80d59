"""Tiny checkpoints of every kind the I/O layer must read, and an independent safetensors reader."""

from __future__ import annotations  # noqa: I001  (mlxmerge must precede mlx.core)

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import mlxmerge  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.io import Quantization
from mlxmerge.demo.tiny import build_model, build_tokenizer

# name: (build_model keyword arguments, what it exercises)
ZOO = {
    "llama_fp16_tied": {"model_type": "llama", "dtype": mx.float16, "tie": True},
    "llama_fp32_untied": {"model_type": "llama", "dtype": mx.float32, "tie": False},
    "qwen2_bf16_sharded": {
        "model_type": "qwen2",
        "dtype": mx.bfloat16,
        "tie": False,
        "shard_size": 40_000,
    },
    "mistral_bf16_mlx": {
        "model_type": "mistral",
        "dtype": mx.bfloat16,
        "tie": True,
        "layout": "mlx",
    },
    "llama_q4_mlx": {
        "model_type": "llama",
        "dtype": mx.float32,
        "tie": True,
        "layout": "mlx",
        "quantize": Quantization(4, 32),
    },
}


def pytest_generate_tests(metafunc):
    # Any test taking ``model_name`` runs once per fixture model.
    if "model_name" in metafunc.fixturenames:
        metafunc.parametrize("model_name", list(ZOO))


@pytest.fixture(scope="session")
def zoo_kwargs() -> dict[str, dict]:
    return ZOO


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Every tiny model, built once per session (seed 0 for all, so same-config models agree)."""
    root = tmp_path_factory.mktemp("zoo")
    return {name: build_model(root / name, tokenizer_dir, seed=0, **kw) for name, kw in ZOO.items()}


@pytest.fixture(scope="session")
def llama_fp32(zoo) -> Path:
    return zoo["llama_fp32_untied"]


# -- an independent safetensors reader (json + struct + numpy, nothing from mlxmerge) --


def raw_header(path: Path) -> tuple[dict, int]:
    """The header dict (``__metadata__`` included) and where the data section starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def raw_tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a model folder as (dtype, shape, raw bytes)."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        header, start = raw_header(f)
        data = f.read_bytes()
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            out[name] = (info["dtype"], tuple(info["shape"]), data[start + b : start + e])
    return out


def to_numpy(dtype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """Decode raw bytes; bf16 becomes float32 by shifting its 16 bits into the high half."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    np_dtype = {"F16": "<f2", "F32": "<f4", "U32": "<u4", "I32": "<i4", "I64": "<i8"}[dtype]
    return np.frombuffer(raw, dtype=np_dtype).reshape(shape)


def dequantize_numpy(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
                     group_size: int) -> np.ndarray:  # fmt: skip
    """MLX affine dequantization from its definition: little-endian fields packed in uint32."""
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    q = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # (..., words, per_word)
    q = q.reshape(*packed.shape[:-1], packed.shape[-1] * per_word).astype(np.float32)
    s = np.repeat(scales.astype(np.float32), group_size, axis=-1)
    b = np.repeat(biases.astype(np.float32), group_size, axis=-1)
    return q * s + b


def float_tensors(folder: Path) -> dict[str, np.ndarray]:
    """The logical float weights of a model folder, dequantizing MLX-quantized triplets."""
    raw = raw_tensors(folder)
    config = json.loads((Path(folder) / "config.json").read_text())
    q = config.get("quantization")
    out = {}
    for name, (dtype, shape, data) in raw.items():
        prefix = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")) and f"{prefix}.weight" in raw:
            continue
        if q and f"{prefix}.scales" in raw:
            arrays = [to_numpy(*raw[f"{prefix}.{k}"]) for k in ("weight", "scales", "biases")]
            out[name] = dequantize_numpy(*arrays, q["bits"], q["group_size"])
        else:
            out[name] = to_numpy(dtype, shape, data)
    return out


@pytest.fixture(scope="session")
def st():
    """The independent reader above, as a fixture (test modules cannot import a conftest safely)."""
    return SimpleNamespace(
        raw_header=raw_header, raw_tensors=raw_tensors, to_numpy=to_numpy,
        dequantize_numpy=dequantize_numpy, float_tensors=float_tensors,
    )  # fmt: skip
