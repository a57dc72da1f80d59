"""Write a complete model folder: weights (MLX or HF layout), config, tokenizer, model card."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import yaml

from mlxmerge.errors import MlxmergeError
from mlxmerge.io.dtypes import FLOAT_NAMES
from mlxmerge.io.finite import FiniteGuard
from mlxmerge.io.layout import CONFIG_ALIASES, Derived, mlx_to_hf
from mlxmerge.io.output import atomic_folder, check_free_space, check_output
from mlxmerge.io.rope_config import with_rope_fields
from mlxmerge.io.writer import DEFAULT_SHARD_SIZE, RawTensor, ShardedWriter, TensorSpec

log = logging.getLogger(__name__)

# What mergekit copies from the tokenizer donor, generation_config.json included (mergekit #275).
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)  # fmt: skip

LAYOUTS = ("mlx", "hf", "gguf")


@dataclass
class Quantization:
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"

    def config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight already in MLX affine quantization (a GGUF Q4_0/Q4_1/Q8_0 tensor's blocks):
    written as it is, its scales and biases cast to the output dtype."""

    weight: mx.array  # uint32, packed
    scales: mx.array
    biases: mx.array


@dataclass
class ModelCard:
    """What the README front matter and body say about how the model was made."""

    title: str
    body: str = ""
    base_models: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=lambda: ["mlxmerge"])


def quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """mlx-lm's rule: Linear/Embedding weights (2-D, or 3-D stacked experts) whose rows split in groups."""
    return name.endswith(".weight") and len(shape) in (2, 3) and shape[-1] % group_size == 0


def output_specs(
    plan: Iterable[tuple[str, tuple[int, ...]]], dtype: mx.Dtype, quant: Quantization | None
) -> list[TensorSpec]:
    """Expand (name, shape) into the tensors actually stored (quantized weights become 3)."""
    specs = []
    for name, shape in plan:
        if quant and quantizable(name, shape, quant.group_size):
            prefix = name.removesuffix(".weight")
            packed = shape[:-1] + (shape[-1] * quant.bits // 32,)
            groups = shape[:-1] + (shape[-1] // quant.group_size,)
            specs.append(TensorSpec(name, packed, mx.uint32))
            specs.append(TensorSpec(f"{prefix}.scales", groups, dtype))
            if quant.mode == "affine":
                specs.append(TensorSpec(f"{prefix}.biases", groups, dtype))
        else:
            specs.append(TensorSpec(name, tuple(shape), dtype))
    return specs


def patch_config(
    config: dict, names: list[str], dtype: mx.Dtype, layout: str, quant: Quantization | None,
    num_layers: int | None = None,
) -> dict:  # fmt: skip
    """Make config.json agree with the tensors actually written."""
    config = with_rope_fields(json.loads(json.dumps(config)))  # mlx-lm reads top-level RoPE keys
    target = (
        config["text_config"]
        if "text_config" in config and "num_hidden_layers" not in config
        else config
    )
    config["torch_dtype"] = FLOAT_NAMES[dtype]
    if "dtype" in config:
        config["dtype"] = FLOAT_NAMES[dtype]
    if num_layers is not None:
        target["num_hidden_layers"] = num_layers
        for key in CONFIG_ALIASES["num_hidden_layers"]:  # GPT-2's n_layer is what mlx-lm reads
            if key in target:
                target[key] = num_layers
        # Per-layer lists (hybrid attention patterns) must keep the new length.
        for key in ("layer_types",):
            if isinstance(target.get(key), list) and len(target[key]) != num_layers:
                target.pop(key)
    if any(n.endswith("embed_tokens.weight") for n in names):
        target["tie_word_embeddings"] = not any(n.endswith("lm_head.weight") for n in names)
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    if quant:
        config["quantization"] = quant.config()
        config["quantization_config"] = quant.config()
    return config


def copy_tokenizer(source: Path, target: Path, chat_template: str | None = None) -> list[str]:
    copied = []
    for fname in TOKENIZER_FILES:
        if (source / fname).is_file():
            shutil.copyfile(source / fname, target / fname)
            copied.append(fname)
    if chat_template is not None:
        set_chat_template(target, chat_template)
    return copied


def set_chat_template(folder: Path, template: str) -> None:
    """Make ``template`` (Jinja text) the folder's one chat template, as transformers >= 4.50 saves it.

    It goes to ``chat_template.jinja``; a template inside ``tokenizer_config.json`` or
    ``chat_template.json`` would compete with it, so those copies are removed.
    """
    if "{" not in template:  # a template name such as "chatml", never stored as the template
        raise MlxmergeError(f"chat template {template!r} is not Jinja text")
    tok_cfg_path = folder / "tokenizer_config.json"
    if tok_cfg_path.exists():
        tok_cfg = json.loads(tok_cfg_path.read_text())
        if tok_cfg.pop("chat_template", None) is not None:
            tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    (folder / "chat_template.json").unlink(missing_ok=True)
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")


def source_name(reference) -> str:
    """How a model card names a source: a hub id as given, a local folder by its name (never
    its absolute path: a card is meant for upload), ``base+adapter`` part by part."""
    from mlxmerge.io.hub import is_hub_reference

    ref = str(reference)
    if is_hub_reference(ref):
        return ref
    path = Path(ref).expanduser()
    if not path.exists() and "+" in ref:
        from mlxmerge.lora.fused import split_reference

        with contextlib.suppress(MlxmergeError):
            parts = split_reference(ref)
            if parts is not None:
                return "+".join(source_name(p) for p in parts)
    path = path.resolve()
    return (path.parent if path.is_file() else path).name or ref


def card_names(value, references) -> object:
    """``value`` (a recipe mapping, list or string) with every string that is one of
    ``references`` replaced by its ``source_name``."""
    if isinstance(value, dict):
        return {k: card_names(v, references) for k, v in value.items()}
    if isinstance(value, list):
        return [card_names(v, references) for v in value]
    if isinstance(value, str) and value in references:
        return source_name(value)
    return value


def write_card(target: Path, card: ModelCard, layout: str) -> None:
    front = {
        "base_model": card.base_models or None,
        "library_name": {"mlx": "mlx", "gguf": "gguf"}.get(layout, "transformers"),
        "tags": card.tags,
    }
    front = {k: v for k, v in front.items() if v}
    text = f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {card.title}\n\n{card.body}\n"
    (target / "README.md").write_text(text)


def write_model(
    target: str | Path,
    plan: list[tuple[str, tuple[int, ...]]],
    compute: Callable[[str], mx.array],
    *,
    config: dict,
    tokenizer_source: Path | None,
    card: ModelCard,
    dtype: mx.Dtype = mx.bfloat16,
    layout: str = "mlx",
    quantize: Quantization | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_layers: int | None = None,
    chat_template: str | None = None,
    extra_files: dict[str, str] | None = None,
    inputs: Iterable[str] = (),
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    guard: FiniteGuard | None = None,
    background: bool = True,
    gguf_type: str | None = None,
) -> Path:
    """Compute each planned tensor with ``compute(name)`` and write the model atomically.

    ``compute`` may return a ``RawTensor`` (a tensor's unchanged stored bytes): when its dtype is
    the output dtype and it is not quantized, its bytes are copied file to file.

    ``plan`` lists (name, shape) of the float tensors, in output order. ``compute`` returns
    a (lazy) array for one name; it is cast, quantized if asked, evaluated and written
    before the next one is computed, which is what bounds memory.

    ``guard`` checks every output tensor (and the inputs ``compute`` registered with
    ``guard.watch``, and the bytes of raw copies) for NaN/Inf; None checks nothing.
    ``background`` writes each tensor in a writer thread while the next one is computed.

    ``layout="gguf"`` writes one ``.gguf`` file of ``gguf_type`` (``io.gguf_write``; default
    ``q8_0``) and the model card instead of safetensors, config and tokenizer files.
    """
    if layout not in LAYOUTS:
        raise MlxmergeError(f"unknown layout {layout!r}; use mlx, hf or gguf")
    if quantize and layout != "mlx":
        why = (
            "for a quantized GGUF give --gguf-type q8_0, q4_k_m, ... instead of --quantize"
            if layout == "gguf"
            else "transformers cannot read MLX quantization"
        )
        raise MlxmergeError(f"quantized output needs --format mlx ({why})")
    if gguf_type is not None and layout != "gguf":
        raise MlxmergeError("--gguf-type applies to --format gguf")
    if layout == "gguf":
        return _write_gguf_model(
            target, plan, compute, config=config, tokenizer_source=tokenizer_source, card=card,
            gguf_type=gguf_type, num_layers=num_layers, chat_template=chat_template,
            extra_files=extra_files, inputs=inputs, force=force, progress=progress, guard=guard,
        )  # fmt: skip
    # Each written tensor: (output name, how to compute it from planned names).
    if layout == "hf":
        written = mlx_to_hf(plan, config.get("model_type"))  # refuses unknown stacked experts
    else:
        written = [(n, Derived((n,), "copy", tuple(shape))) for n, shape in plan]
    target = check_output(target, inputs, force=force)
    plan = [(n, d.shape) for n, d in written]
    specs = output_specs(plan, dtype, quantize)
    tokenizer_bytes = sum(
        (Path(tokenizer_source) / f).stat().st_size
        for f in TOKENIZER_FILES
        if tokenizer_source is not None and (Path(tokenizer_source) / f).is_file()
    )
    check_free_space(target, sum(s.nbytes for s in specs) + tokenizer_bytes, "the model")
    metadata = {"format": "mlx" if layout == "mlx" else "pt"}
    names = [n for n, _ in plan]
    # A planned tensor feeding several outputs (the experts of one stacked tensor) is computed
    # once and kept until its last use.
    uses = Counter(s for _, d in written for s in d.sources)
    cache: dict[str, mx.array] = {}

    def planned(source: str) -> mx.array:
        if source not in cache:
            got = compute(source)
            cache[source] = _load_raw(got, source, guard) if isinstance(got, RawTensor) else got
            mx.eval(cache[source])  # once, not once per expert slice taken from it
            if progress:
                progress(source)
        x = cache[source]
        uses[source] -= 1
        if uses[source] == 0:
            del cache[source]
        return x

    with atomic_folder(target, force=force) as tmp:
        with ShardedWriter(
            tmp, specs, shard_size=shard_size, metadata=metadata, guard=guard,
            background=background,
        ) as writer:  # fmt: skip
            for name, d in written:
                shape = d.shape
                if d.op == "copy" and uses[d.sources[0]] == 1:
                    x = compute(d.sources[0])
                    uses[d.sources[0]] = 0
                    if isinstance(x, QuantizedTensor):  # blocks carried over: no re-quantizing
                        prefix = name.removesuffix(".weight")
                        writer.write(name, x.weight)
                        writer.write(f"{prefix}.scales", x.scales.astype(dtype))
                        writer.write(f"{prefix}.biases", x.biases.astype(dtype))
                        if progress:
                            progress(d.sources[0])
                        continue
                    if isinstance(x, RawTensor):
                        if x.dtype == dtype and not (
                            quantize and quantizable(name, shape, quantize.group_size)
                        ):
                            writer.write_raw(name, x)  # unchanged bytes: a kernel copy
                            if progress:
                                progress(d.sources[0])
                            continue
                        x = _load_raw(x, name, guard)
                    if progress:
                        progress(d.sources[0])
                else:
                    x = d.apply([planned(src) for src in d.sources])
                if tuple(x.shape) != tuple(shape):
                    raise MlxmergeError(
                        f"{name}: computed shape {tuple(x.shape)}, planned {tuple(shape)}"
                    )
                if quantize and quantizable(name, shape, quantize.group_size):
                    parts = mx.quantize(
                        x.astype(dtype), group_size=quantize.group_size, bits=quantize.bits,
                        mode=quantize.mode,
                    )  # fmt: skip
                    prefix = name.removesuffix(".weight")
                    writer.write(name, parts[0])
                    writer.write(f"{prefix}.scales", parts[1])
                    if quantize.mode == "affine":
                        writer.write(f"{prefix}.biases", parts[2])
                else:
                    writer.write(name, x)
                mx.clear_cache()
        out_config = patch_config(config, names, dtype, layout, quantize, num_layers)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2))
        if tokenizer_source is not None:
            copy_tokenizer(Path(tokenizer_source), tmp, chat_template)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        write_card(tmp, card, layout)
    log.info("wrote %s (%d tensors, %d shards)", target, len(specs), len(writer.files))
    return target


def _write_gguf_model(
    target, plan, compute, *, config, tokenizer_source, card, gguf_type, num_layers,
    chat_template, extra_files, inputs, force, progress, guard,
) -> Path:  # fmt: skip
    from mlxmerge.io.gguf_write import (
        DEFAULT_GGUF_TYPE,
        parse_gguf_type,
        plan_gguf,
        quantizer,
        write_gguf_folder,
    )

    gguf_type = parse_gguf_type(gguf_type or DEFAULT_GGUF_TYPE)
    quantizer(gguf_type)  # a K-quant needs llama.cpp: say so before any tensor is computed
    target = Path(target).expanduser()
    names = [n for n, _ in plan]
    config = patch_config(config, names, mx.float32, "hf", None, num_layers)
    plan_gguf(plan, config, gguf_type)  # every refusal before the output folder is touched
    target = check_output(target, inputs, force=force)

    def value(name: str) -> mx.array:
        x = compute(name)
        return _load_raw(x, name, guard) if isinstance(x, RawTensor) else x

    def check(name: str, x: mx.array) -> None:
        if guard is not None:
            guard.settle()
            guard.check_output(name, x)

    with atomic_folder(target, force=force) as tmp:
        path = write_gguf_folder(
            tmp, plan, value, config=config, tokenizer_source=tokenizer_source,
            chat_template=chat_template, gguf_type=gguf_type, name=target.name,
            progress=progress, check=check,
        )  # fmt: skip
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        write_card(tmp, card, "gguf")
    log.info("wrote %s", target / path.name)
    return target


def _load_raw(raw: RawTensor, name: str, guard: FiniteGuard | None) -> mx.array:
    # Bytes that must change after all: check them as the input they are.
    x = raw.load()
    return x if guard is None else guard.watch(str(raw.file.parent), name, x)


def output_size(
    plan: list[tuple[str, tuple[int, ...]]], dtype: mx.Dtype, quant: Quantization | None
) -> int:
    return sum(s.nbytes for s in output_specs(plan, dtype, quant))


def tensor_bytes(shape: tuple[int, ...], dtype: mx.Dtype = mx.float32) -> int:
    return math.prod(shape) * dtype.size
