"""Write a model as one GGUF file, the way llama.cpp's ``convert_hf_to_gguf.py`` writes it, streamed.

Names, Q/K permutation, Gemma's norm shift and the ``{arch}.*`` metadata come from
``io.gguf_names`` (shared with the reader); the tokenizer metadata from
``io.gguf_tokenizer_write``. Tensor types follow the converter's ``prepare_tensors``: 1-D
tensors, norms, non-``.weight`` tensors and MoE routers stay F32; a tensor whose rows do not
split into the type's blocks falls back to F16 (the converter's ``QuantError`` fallback). For the
4/5-bit types the output projection (``output.weight``, or ``token_embd.weight`` when tied) is
Q8_0: llama.cpp's ``llama-quantize`` keeps it at higher precision too (the released
SmolLM2-135M-Instruct Q4_1 file stores its tied ``token_embd`` as Q8_0).

Streaming: every tensor's name, type, shape and byte size is known from the plan, so the header,
metadata and tensor table are written first (``gguf.GGUFWriter``'s ``add_tensor_info`` /
``write_*_to_file``), then each tensor is computed, quantized with ``gguf.quants`` and appended
before the next one is computed: peak memory is about three copies of the largest tensor
(float32 values, the planned tensor, the quantized bytes), not the model.

K-quant mixes (``q4_k_m``, ``q5_k_m``, ``q6_k``) are not reimplemented: a bf16 GGUF is written to
a scratch file beside the output, then llama.cpp's own ``llama_model_quantize`` (llama-cpp-python,
optional) makes the mix from it, with llama.cpp's per-tensor choices and fallbacks.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from mlxmerge.errors import MlxmergeError, OutputError
from mlxmerge.io import gguf_names
from mlxmerge.io.gguf_tokenizer_write import add_tokenizer, read_tokenizer_json

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# --gguf-type → (tensor type of the quantizable weights, general.file_type)
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1), "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1),
}  # fmt: skip
# Half the size of f16 at a perplexity cost llama.cpp measures in the 4th decimal; a GGUF is a
# model to run, the master copy stays in --format mlx/hf. f16/bf16/f32 are the lossless choices.
DEFAULT_GGUF_TYPE = "q8_0"
# K-quant mixes, made by llama.cpp's own quantizer (``llama_model_quantize``, llama-cpp-python)
# from a bf16 GGUF we write first. Not reimplemented here.
LLAMA_CPP_TYPES: dict[str, gguf.LlamaFileType] = {
    "q4_k_m": F.MOSTLY_Q4_K_M, "q5_k_m": F.MOSTLY_Q5_K_M, "q6_k": F.MOSTLY_Q6_K,
}  # fmt: skip
_LOW_BIT = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}
# Tensors the converter always keeps F32 (besides 1-D tensors and norms): MoE routers.
_F32_SUFFIXES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


def parse_gguf_type(text: str) -> str:
    """Validate a ``--gguf-type`` value (case-insensitive); return it lower-cased."""
    key = str(text).lower()
    if key not in GGUF_TYPES and key not in LLAMA_CPP_TYPES:
        known = ", ".join([*GGUF_TYPES, *LLAMA_CPP_TYPES])
        raise MlxmergeError(f"unknown GGUF type {text!r}; choose one of {known}")
    return key


def quantizer(gguf_type: str):
    """The ``llama_cpp`` module for a K-quant ``gguf_type`` (None for the others).

    Raises MlxmergeError when llama-cpp-python is not installed: checked before any tensor.
    """
    if parse_gguf_type(gguf_type) not in LLAMA_CPP_TYPES:
        return None
    try:
        import llama_cpp
    except ImportError:
        raise MlxmergeError(
            f"--gguf-type {gguf_type} is made by llama.cpp's quantizer: "
            "pip install 'mlxmerge[llamacpp]' (llama-cpp-python), or use q8_0/q5_1/q4_1/..."
        ) from None
    return llama_cpp


def llama_cpp_quantize(source: Path, target: Path, gguf_type: str) -> None:
    """Quantize the GGUF ``source`` to the K-quant mix ``gguf_type`` with llama.cpp itself.

    Raises MlxmergeError when llama-cpp-python is not installed or llama.cpp fails.
    """
    llama_cpp = quantizer(gguf_type)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LLAMA_CPP_TYPES[gguf_type])
    params.nthread = 0  # all cores
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise MlxmergeError(f"llama.cpp could not quantize {source.name} to {gguf_type}")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the GGUF file, and how it comes from a planned (MLX-layout) tensor."""

    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    source: str  # planned MLX-layout name
    shape: tuple[int, ...]  # row-major shape as stored (GGUF lists it reversed)
    qtype: gguf.GGMLQuantizationType
    heads: tuple[int, int] | None = None  # (n_head, n_head_kv) for Q/K rows llama.cpp permutes
    shift: bool = False  # stored as 1 + w (Gemma RMSNorm)

    @property
    def nbytes(self) -> int:
        if self.qtype in (Q.F32, Q.F16, Q.BF16):
            return math.prod(self.shape) * (4 if self.qtype == Q.F32 else 2)
        return math.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))


def tensor_type(name: str, shape: tuple[int, ...], qtype, *, output: bool = False):
    """The stored type of GGUF tensor ``name`` in a file of ``qtype`` (see the module docstring)."""
    if len(shape) <= 1 or name.endswith(("_norm.weight", *_F32_SUFFIXES)):
        return Q.F32
    if not name.endswith(".weight"):
        return Q.F32
    if output and qtype in _LOW_BIT:
        qtype = Q.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return Q.F16  # the converter's fallback when a row does not split into blocks
    return qtype


def _text_config(config: dict) -> dict:
    return config["text_config"] if "text_config" in config and "num_hidden_layers" not in config else config  # fmt: skip


def plan_gguf(
    plan: list[tuple[str, tuple[int, ...]]], config: dict, gguf_type: str
) -> list[GGUFTensor]:
    """The GGUF tensors of an MLX-layout ``plan``, in plan order.

    Raises CheckpointError for an architecture with no GGUF mapping, OutputError naming a
    tensor llama.cpp's architecture has no name for (a stacked expert of an unsupported
    model, an extra module).
    """
    cfg = _text_config(config)
    model_type = cfg.get("model_type") or config.get("model_type")
    arch = gguf_names.gguf_arch(model_type)
    gguf_type = parse_gguf_type(gguf_type)
    qtype = GGUF_TYPES["bf16" if gguf_type in LLAMA_CPP_TYPES else gguf_type][0]
    n_blocks = int(cfg.get("num_hidden_layers") or 0)
    names = gguf_names.mlx_to_gguf_map(model_type, n_blocks)
    n_head = cfg.get("num_attention_heads")
    n_kv = cfg.get("num_key_value_heads") or n_head
    planned = {n for n, _ in plan}
    out = []
    for name, shape in plan:
        target = names.get(name)
        if target is None:
            raise OutputError(
                f"{name}: llama.cpp's {arch} architecture has no tensor for it; "
                f"write this model with --format mlx or hf"
            )
        shape = tuple(shape)
        if gguf_names.leading_one(name) and shape[:1] == (1,):
            shape = shape[1:]
        heads = None
        which = gguf_names.permute_heads(model_type, name)
        if which is not None:
            heads = (n_head, n_head) if which == 0 else (n_head, n_kv)
        output = target == "output.weight" or (
            target == "token_embd.weight" and "lm_head.weight" not in planned
        )
        out.append(
            GGUFTensor(
                target, name, shape, tensor_type(target, shape, qtype, output=output), heads,
                gguf_names.norm_shifted(model_type, name),
            )
        )  # fmt: skip
    return out


def to_gguf_data(t: GGUFTensor, x: mx.array) -> np.ndarray:
    """The stored bytes (or float array) of ``t`` from its planned value ``x``."""
    a = np.asarray(x.astype(mx.float32)).reshape(t.shape)
    if t.heads is not None:
        a = gguf_names.permute(a, *t.heads)
    if t.shift:
        a = a + np.float32(1)
    if t.qtype == Q.F32:
        return np.ascontiguousarray(a, dtype=np.float32)
    if t.qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(a), t.qtype)


def file_name(name: str, tensors: list[GGUFTensor], gguf_type: str) -> str:
    """``<name>-<size>-<TYPE>.gguf``: llama.cpp's naming convention (``gguf.naming_convention``)."""
    return gguf.naming_convention(name, None, None, None, size_label(tensors), gguf_type.upper()) + ".gguf"  # fmt: skip


def size_label(tensors: list[GGUFTensor]) -> str:
    """``135M``, ``8x7.0B``: the converter's size label from the parameter count."""
    total = shared = experts = 0
    n_expert = 0
    for t in tensors:
        n = math.prod(t.shape)
        total += n
        if "_exps." in t.name and len(t.shape) >= 3:
            n_expert = t.shape[0]
            experts += n // n_expert
        else:
            shared += n
    return gguf.size_label(total, shared, experts, n_expert)


def write_gguf(
    path: Path,
    tensors: list[GGUFTensor],
    compute: Callable[[str], mx.array],
    *,
    config: dict,
    tokenizer_folder: Path | None,
    gguf_type: str,
    name: str,
    progress: Callable[[str], None] | None = None,
    check: Callable[[str, mx.array], None] | None = None,
) -> Path:
    """Write ``tensors`` (computed one at a time by ``compute(source name)``) to ``path``.

    Metadata: ``general.*`` (architecture, type, name, size label, file type, quantization
    version), the ``{arch}.*`` hyperparameters of ``config`` and the tokenizer of
    ``tokenizer_folder``. ``check(name, x)`` sees each evaluated tensor (NaN/Inf checks).
    """
    gguf_type = parse_gguf_type(gguf_type)
    arch = gguf_names.gguf_arch(_text_config(config).get("model_type") or config.get("model_type"))
    writer = gguf.GGUFWriter(path, arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_size_label(size_label(tensors))
        for key, value, vtype in gguf_names.metadata_from_config(config):
            writer.add_key_value(key, value, vtype)
        writer.add_file_type(GGUF_TYPES[gguf_type][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer_folder is not None:
            embed = next((t for t in tensors if t.name == "token_embd.weight"), None)
            n_vocab = embed.shape[0] if embed else int(_text_config(config).get("vocab_size", 0))
            add_tokenizer(writer, tokenizer_folder, n_vocab)
        for t in tensors:
            writer.add_tensor_info(
                t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            x = compute(t.source)
            mx.eval(x)
            if check is not None:
                check(t.source, x)
            data = to_gguf_data(t, x)
            del x
            if data.nbytes != t.nbytes:  # an internal invariant: the table promised these bytes
                raise AssertionError(f"{t.name}: {data.nbytes} bytes, planned {t.nbytes}")
            writer.write_tensor_data(data)
            del data
            mx.clear_cache()
            if progress:
                progress(t.source)
    finally:
        writer.close()
    return path


def write_gguf_folder(
    tmp: Path,
    plan: list[tuple[str, tuple[int, ...]]],
    compute: Callable[[str], mx.array],
    *,
    config: dict,
    tokenizer_source: Path | None,
    chat_template: str | None,
    gguf_type: str,
    name: str,
    progress: Callable[[str], None] | None = None,
    check: Callable[[str, mx.array], None] | None = None,
) -> Path:
    """The GGUF file of a model folder being built in ``tmp`` (``io.model_folder.write_model``).

    The tokenizer files are staged in a scratch folder (with ``chat_template`` applied, as for
    the other formats) and read from there; only the ``.gguf`` stays in ``tmp``.
    """
    from mlxmerge.io.model_folder import copy_tokenizer

    tensors = plan_gguf(plan, config, gguf_type)
    path = tmp / file_name(name, tensors, gguf_type)
    k_quant = gguf_type in LLAMA_CPP_TYPES
    with tempfile.TemporaryDirectory(dir=tmp) as scratch:
        tok = None
        if tokenizer_source is not None:
            read_tokenizer_json(Path(tokenizer_source))  # its errors name the user's file
            tok = Path(scratch)
            copy_tokenizer(Path(tokenizer_source), tok, chat_template)
            (tok / "config.json").write_text(json.dumps(_text_config(config)))  # special token ids
        written = Path(scratch) / "bf16.gguf" if k_quant else path
        write_gguf(
            written, tensors, compute, config=config, tokenizer_folder=tok,
            gguf_type="bf16" if k_quant else gguf_type, name=name, progress=progress, check=check,
        )  # fmt: skip
        if k_quant:
            llama_cpp_quantize(written, path, gguf_type)
    return path
