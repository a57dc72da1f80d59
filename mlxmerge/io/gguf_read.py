"""Read GGUF files (llama.cpp, Ollama) as checkpoints: tensors on demand, under mlx-lm's names.

The container is parsed and validated by ``gguf_file`` before any tensor is read. Tensor data
is then read through a memory map, one tensor at a time, and dequantized with
``gguf.quants.dequantize`` (llama.cpp's own numpy port of its dequantization), so memory stays
flat in model size. Names, the Q/K row permutation, Gemma's norm shift and config.json come
from ``gguf_names``; the tokenizer from ``gguf_tokenizer``. The config and tokenizer files go to
a small folder (``ckpt.path``, cached under ``~/.cache/mlxmerge/gguf``) so every verb that copies
a tokenizer or reads config.json from ``ckpt.path`` works unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from mlxmerge.errors import CheckpointError
from mlxmerge.io import gguf_names as names
from mlxmerge.io.checkpoint import Checkpoint
from mlxmerge.io.gguf_file import GGUFTensor, read_gguf_header
from mlxmerge.io.model_folder import QuantizedTensor
from mlxmerge.io.safetensors_file import TensorEntry
from mlxmerge.io.writer import RawTensor

# Bumped when what the sidecar folder holds changes, so old caches are rebuilt.
SIDECAR_VERSION = "1"
# GGUF block types that are MLX affine quantization with group size 32, and their bits.
MLX_BLOCKS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
# Stored types that stay as they are (no dequantization) and their MLX dtype.
FLOAT_TYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


# -- the checkpoint -------------------------------------------------------------------------


@dataclass
class Source:
    """How one MLX-named tensor is read from the file."""

    tensor: GGUFTensor
    permute: int | None = None  # 0: Q rows (num_attention_heads), 1: K rows (num_key_value_heads)
    shift: bool = False  # Gemma norm: stored 1 + w
    leading_one: bool = False  # MLX shape (1, n), stored (n,)


@dataclass
class GGUFCheckpoint(Checkpoint):
    """A GGUF model seen under MLX-layout names, dequantized tensor by tensor as read.

    ``entries`` holds one TensorEntry per MLX name whose ``dtype`` is the ggml type name
    (``Q4_K``, ``F16``) and whose byte range is the stored one. ``dtype(name)`` is the stored
    float type for F32/F16/BF16 tensors and float32 for every quantized one.
    """

    sources: dict[str, Source] = field(default_factory=dict)

    def is_quantized(self, name: str) -> bool:
        return False  # not MLX-quantized: get() hands back dequantized values

    def gguf_type(self, name: str) -> str:
        """The ggml type the tensor is stored as (``Q4_1``, ``F32``)."""
        return self._source(name).tensor.type.name

    def dtype(self, name: str) -> mx.Dtype:
        s = self._source(name)
        if s.shift:  # 1 + w - 1 is computed in float32
            return mx.float32
        return FLOAT_TYPES.get(s.tensor.type.name, mx.float32)

    def stored_dtype(self, name: str) -> str:
        return self.gguf_type(name)

    def raw(self, name: str) -> RawTensor | None:
        s = self._source(name)
        if s.tensor.type.name not in FLOAT_TYPES or s.permute is not None or s.shift:
            return None
        t = s.tensor
        return RawTensor(t.file, t.offset, t.nbytes, self.dtype(name), self.shape(name),
                         lambda: self.get(name))  # fmt: skip

    def get(self, name: str, dtype: mx.Dtype | None = None) -> mx.array:
        """The tensor (dequantized to float32 when stored quantized), optionally cast.

        Reads only this tensor's bytes, through a memory map; MLX receives a copy, so nothing
        keeps the file mapped once the call returns."""
        s = self._source(name)
        if s.tensor.type.name == "BF16":  # numpy has no bfloat16: MLX reads the bits
            bits = np.array(_map(s.tensor).view(np.uint16))
            x = mx.array(bits).view(mx.bfloat16).reshape(self.shape(name))
        else:
            x = mx.array(self.numpy(name))
        if s.permute is not None:
            x = names.unpermute(x, *self._heads(s.permute))
        return x if dtype is None else x.astype(dtype)

    def numpy(self, name: str) -> np.ndarray:
        """The tensor as numpy, dequantized with ``gguf.quants.dequantize`` (no permutation
        undone; BF16 comes back as float32). This is what transformers' GGUF loader reads."""
        s = self._source(name)
        t = s.tensor
        data = _map(t)
        if t.type.name in ("F32", "F16"):
            x = data.view(np.float32 if t.type.name == "F32" else np.float16).reshape(t.shape)
            x = np.array(x)
        else:
            x = gguf.quants.dequantize(data.reshape(_byte_shape(t)), t.type)
        if s.shift:
            x = x.astype(np.float32) - 1
        return x.reshape(self.shape(name))

    def mlx_blocks(self, name: str, bits: int, group_size: int) -> QuantizedTensor | None:
        """The tensor as MLX affine quantization (packed uint32 weight, float32 scales and
        biases) made from its GGUF blocks with no float round trip, or None when the stored
        type does not map onto ``bits`` at ``group_size``.

        Q4_0 (``w = d·(q − 8)``) is scale ``d``, bias ``−8d``; Q4_1 (``w = d·q + m``) is scale
        ``d``, bias ``m``; Q8_0 (``w = d·q``, q signed) is q + 128 with scale ``d``, bias
        ``−128d``: MLX's ``w = scale·q + bias`` per group of 32 gives the same values (exactly
        in float32; the scales round as the output dtype stores them). Block layouts: ggml
        ``block_q4_0``, ``block_q4_1``, ``block_q8_0``."""
        s = self._source(name)
        t = s.tensor
        if MLX_BLOCKS.get(t.type.name) != bits or group_size != 32 or s.shift or len(t.shape) < 2:
            return None
        _, size = gguf.GGML_QUANT_SIZES[t.type]
        raw = np.array(_map(t)).reshape(-1, size)  # (n_blocks, block bytes)
        d = raw[:, 0:2].view(np.float16).astype(np.float32)  # (n_blocks, 1)
        if t.type.name == "Q8_0":
            q = (raw[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            bias = -128 * d
        else:
            first = 4 if t.type.name == "Q4_1" else 2
            packed = raw[:, first : first + 16]  # element j: low nibble of byte j, j+16: high
            q = np.concatenate([packed & 0x0F, packed >> 4], axis=1)
            bias = raw[:, 2:4].view(np.float16).astype(np.float32) if first == 4 else -8 * d
        per_word = 32 // bits  # MLX packs element i of a word at bits [bits·i, bits·(i+1))
        words = q.reshape(-1, per_word).astype(np.uint32) << (
            bits * np.arange(per_word, dtype=np.uint32)
        )
        words = np.bitwise_or.reduce(words, axis=1)
        rows = t.shape[:-1]
        out = [words.reshape(*rows, -1), d.reshape(*rows, -1), bias.reshape(*rows, -1)]
        if s.permute is not None:  # whole rows move: the same permutation on every part
            out = [names.unpermute(x, *self._heads(s.permute)) for x in out]
        return QuantizedTensor(*(mx.array(x) for x in out))

    def _heads(self, which: int) -> tuple[int, int]:
        heads = int(self.config["num_attention_heads"])
        kv = int(self.config.get("num_key_value_heads") or heads)
        return (heads, heads) if which == 0 else (heads, kv)

    def _source(self, name: str) -> Source:
        try:
            return self.sources[name]
        except KeyError:
            raise CheckpointError(f"{self.reference}: no tensor named {name}") from None


def carried_tensors(ckpt: Checkpoint, bits: int, group_size: int) -> list[str]:
    """The tensors of ``ckpt`` whose GGUF blocks map exactly onto MLX ``bits``-bit affine
    quantization at ``group_size`` (``GGUFCheckpoint.mlx_blocks``); [] for other checkpoints."""
    if not isinstance(ckpt, GGUFCheckpoint) or group_size != 32:
        return []
    return [
        n for n, s in ckpt.sources.items()
        if MLX_BLOCKS.get(s.tensor.type.name) == bits and not s.shift and len(s.tensor.shape) >= 2
    ]  # fmt: skip


def _map(t: GGUFTensor) -> np.ndarray:
    return np.memmap(t.file, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))


def _byte_shape(t: GGUFTensor) -> tuple[int, ...]:
    return gguf.quants.quant_shape_to_byte_shape(t.shape or (1,), t.type)


def open_gguf(reference: str, files: list[Path]) -> GGUFCheckpoint:
    """Open the GGUF model in ``files`` (one, or a split model's parts in order)."""
    parsed = [read_gguf_header(f) for f in files]
    fields = parsed[0].fields
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{files[0]}: no general.architecture in the GGUF metadata")
    tensors = [t for p in parsed for t in p.tensors]
    by_name = {t.name: t for t in tensors}
    if len(by_name) != len(tensors):
        raise CheckpointError(f"{files[0]}: the split parts repeat a tensor")
    embd = by_name.get("token_embd.weight")
    config = names.config_from_metadata(arch, fields, set(by_name), embd.shape[0] if embd else None)
    model_type = config["model_type"]
    n_blocks = int(config.get("num_hidden_layers") or 0)
    to_mlx = names.gguf_to_mlx_map(model_type, n_blocks)
    sources: dict[str, Source] = {}
    for t in tensors:
        if t.name in names.SKIPPED:
            continue
        mlx = to_mlx.get(t.name)
        if mlx is None:
            raise CheckpointError(
                f"{t.file}: tensor {t.name} has no known {model_type} counterpart "
                f"(architecture {arch}, {n_blocks} blocks); is the file complete and supported?"
            )
        sources[mlx] = Source(
            t, names.permute_heads(model_type, mlx), names.norm_shifted(model_type, mlx),
            names.leading_one(mlx),
        )  # fmt: skip
    if not sources:
        raise CheckpointError(f"{files[0]}: holds no tensors")
    config["torch_dtype"] = _float_name(tensors)
    entries = {}
    for mlx, s in sources.items():
        t = s.tensor
        shape = (1, *t.shape) if s.leading_one else t.shape
        entries[mlx] = TensorEntry(mlx, t.type.name, shape, t.file, t.offset, t.offset + t.nbytes)
    folder = sidecar_folder(files, fields, config)
    meta = {"format": "gguf", "gguf_architecture": arch}
    ckpt = GGUFCheckpoint(
        str(reference), folder, config, entries, files, None, meta, sources=sources
    )
    _check_heads(ckpt)
    return ckpt


def _check_heads(ckpt: GGUFCheckpoint) -> None:
    for name, s in ckpt.sources.items():
        if s.permute is None:
            continue
        if "num_attention_heads" not in ckpt.config:
            raise CheckpointError(
                f"{s.tensor.file}: no attention.head_count in the metadata; cannot undo "
                f"llama.cpp's row permutation of {s.tensor.name}"
            )
        heads = ckpt._heads(s.permute)[s.permute]
        if ckpt.shape(name)[0] % (2 * heads):
            raise CheckpointError(
                f"{s.tensor.file}: {s.tensor.name} has {ckpt.shape(name)[0]} rows, not a "
                f"multiple of 2 × {heads} heads"
            )


def _float_name(tensors: list[GGUFTensor]) -> str:
    kinds = {t.type.name for t in tensors}
    if "BF16" in kinds:
        return "bfloat16"
    return "float32" if kinds <= {"F32"} else "float16"


# -- the folder holding config.json and the tokenizer ---------------------------------------


def _cache_root() -> Path:
    root = os.environ.get("MLXMERGE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mlxmerge"


def sidecar_folder(files: list[Path], fields: dict, config: dict) -> Path:
    """A folder with config.json and the tokenizer files of the GGUF model in ``files``.

    Cached per (file, size, mtime) under ``$MLXMERGE_CACHE`` or ``~/.cache/mlxmerge``, written
    atomically; a temporary folder when the cache is not writable."""
    from mlxmerge.io.gguf_tokenizer import write_tokenizer

    st = files[0].stat()
    key = f"{files[0].resolve()}|{st.st_size}|{st.st_mtime_ns}|{SIDECAR_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = _cache_root() / "gguf" / f"{files[0].stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    except OSError:
        tmp = target = Path(tempfile.mkdtemp(prefix="mlxmerge-gguf-"))
    try:
        write_tokenizer(fields, tmp, config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tmp != target:
            try:
                os.replace(tmp, target)
            except OSError:  # another process built it first
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        if tmp != target:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# -- forward passes ---------------------------------------------------------------------------


def load_mlx_lm_gguf(ckpt: GGUFCheckpoint, adapter_path: str | os.PathLike | None = None):
    """``(model, tokenizer)`` for a GGUF checkpoint: the mlx-lm model class built from the
    config, its weights taken from the checkpoint tensor by tensor (no converted copy on disk).

    Weights are float32 on the CPU (MLX's CPU kernels compute in float32 anyway), float16 on a
    GPU; F16/BF16 tensors keep their stored type. ``adapter_path`` applies an mlx-lm LoRA adapter.
    """
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import _get_classes, load_tokenizer

    config = dict(ckpt.config)
    model_class, args_class = _get_classes(config=config)
    model = model_class(args_class.from_dict(config))
    wide = mx.float32 if mx.default_device().type == mx.DeviceType.cpu else mx.float16
    weights = {}
    for name in ckpt.names():
        stored = ckpt.dtype(name)
        x = ckpt.get(name, stored if stored != mx.float32 else wide)
        mx.eval(x)  # one tensor at a time: the dequantization temporaries do not pile up
        weights[name] = x
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    if adapter_path:
        model = load_adapters(model, str(adapter_path))
    model.eval()
    eos = config.get("eos_token_id")
    tokenizer = load_tokenizer(ckpt.path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    return model, tokenizer
