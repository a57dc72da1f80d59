"""Open a checkpoint lazily: validated headers first, lazy ``mx.array``s on demand."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxmerge.errors import CheckpointError
from mlxmerge.io.architecture import check_architecture
from mlxmerge.io.dtypes import SAFETENSORS_TO_MX
from mlxmerge.io.hub import resolve_reference
from mlxmerge.io.layout import CONFIG_ALIASES, Derived, hf_to_mlx
from mlxmerge.io.rope_config import with_rope_fields
from mlxmerge.io.safetensors_file import TensorEntry, read_header
from mlxmerge.io.writer import RawTensor

INDEX_NAME = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """A model on disk: its config and where each tensor lives. Tensors load lazily.

    Tensors are named as in MLX layout whatever the layout on disk: an HF-layout checkpoint's
    per-expert (or GPT-2 Conv1D) tensors appear as mlx-lm's stacked (or transposed) ones, so
    inputs in either layout share one set of names (``io.layout``).
    """

    reference: str
    path: Path  # the folder (or the single file's folder)
    config: dict
    entries: dict[str, TensorEntry]  # raw safetensors entries, quantized triplets included
    files: list[Path]
    quantization: dict | None = None
    metadata: dict = field(default_factory=dict)  # __metadata__ of the first shard
    # MLX name → how it is computed from stored HF-layout tensors (only names that differ)
    derived: dict[str, Derived] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)  # stored names that ``derived`` replaces
    _names: list[str] | None = field(default=None, repr=False)  # names(), sorted once

    # -- what the model is -------------------------------------------------
    def config_value(self, key: str, default=None):
        """A config key, looking inside ``text_config`` for multimodal configs."""
        if key in self.config:
            return self.config[key]
        return self.config.get("text_config", {}).get(key, default)

    @property
    def model_type(self) -> str | None:
        return self.config_value("model_type")

    @property
    def num_layers(self) -> int:
        _, n = self.config_field("num_hidden_layers")
        if n is None:
            n = 1 + max(
                (layer_index(k) for k in self.names() if layer_index(k) is not None), default=-1
            )
        return int(n)

    def config_field(self, key: str) -> tuple[str | None, object]:
        """(field name, value) of a standard config key or this architecture's own name for it
        (GPT-2 ``n_embd`` for ``hidden_size``); (None, None) when absent."""
        for k in (key, *CONFIG_ALIASES.get(key, ())):
            v = self.config_value(k)
            if v is not None:
                return k, v
        return None, None

    @property
    def tie_word_embeddings(self) -> bool:
        if "lm_head.weight" in self.entries:
            return False
        return bool(self.config_value("tie_word_embeddings", True))

    @property
    def size_on_disk(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    # -- logical tensors (quantized triplets appear as one dequantized weight) --
    def names(self) -> list[str]:
        """Logical tensor names, sorted the way mlx-lm and transformers list them."""
        if self._names is None:  # sorted once: planners ask for it per layer
            stored = (
                n for n in self.entries if not self._is_quant_companion(n) and n not in self.hidden
            )
            self._names = sorted([*stored, *self.derived], key=natural_key)
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        if name in self.derived:
            return True
        return (
            name in self.entries and name not in self.hidden and not self._is_quant_companion(name)
        )

    def is_quantized(self, name: str) -> bool:
        if name in self.derived:
            return False
        prefix = name.removesuffix(".weight")
        return name.endswith(".weight") and f"{prefix}.scales" in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.derived:
            return self.derived[name].shape
        entry = self._entry(name)
        if self.is_quantized(name):
            bits = self.quant_params(name)["bits"]
            return entry.shape[:-1] + (entry.shape[-1] * 32 // bits,)
        return entry.shape

    def dtype(self, name: str) -> mx.Dtype:
        if name in self.derived:
            return self.dtype(self.derived[name].sources[0])
        if self.is_quantized(name):
            name = name.removesuffix(".weight") + ".scales"
        stored = self._entry(name).dtype
        if stored not in SAFETENSORS_TO_MX:
            raise CheckpointError(
                f"{self.entries[name].file}: tensor {name} is stored as {stored}, which MLX cannot "
                "load (FP8 and float64 checkpoints are not supported; convert them to bf16 first)"
            )
        return SAFETENSORS_TO_MX[stored]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def quant_params(self, name: str) -> dict:
        q = dict(self.quantization or {})
        override = q.get(name.removesuffix(".weight"))
        params = {"group_size": q.get("group_size", 64), "bits": q.get("bits", 4),
                  "mode": q.get("mode", "affine")}  # fmt: skip
        if isinstance(override, dict):
            params.update({k: override[k] for k in ("group_size", "bits", "mode") if k in override})
        return params

    def raw(self, name: str) -> RawTensor | None:
        """The tensor's stored bytes (None when stored quantized: those must be dequantized)."""
        d = self.derived.get(name)
        if d is not None:
            return self.raw(d.sources[0]) if d.op == "copy" else None
        if self.is_quantized(name):
            return None
        e = self._entry(name)
        return RawTensor(e.file, e.data_start + e.begin, e.nbytes, self.dtype(name), e.shape,
                         lambda: self.get(name))  # fmt: skip

    def get(self, name: str, dtype: mx.Dtype | None = None) -> mx.array:
        """The tensor as a lazy array (dequantized if stored quantized), optionally cast."""
        d = self.derived.get(name)
        if d is not None:
            x = d.apply([self.get(s) for s in d.sources])
            return x if dtype is None else x.astype(dtype)
        entry = self._entry(name)
        self.dtype(name)  # refuses dtypes mx.load would reject or misread (FP8 as raw bytes)
        # A fresh lazy dict per call: keeping one would pin every evaluated tensor in memory.
        arrays = mx.load(str(entry.file))
        if self.is_quantized(name):
            prefix = name.removesuffix(".weight")
            p = self.quant_params(name)
            scales_file = self.entries[f"{prefix}.scales"].file
            aux = arrays if scales_file == entry.file else mx.load(str(scales_file))
            biases = aux.get(f"{prefix}.biases")
            x = mx.dequantize(
                arrays[name], aux[f"{prefix}.scales"], biases,
                group_size=p["group_size"], bits=p["bits"], mode=p["mode"],
            )  # fmt: skip
        else:
            x = arrays[name]
        return x if dtype is None else x.astype(dtype)

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype string a logical tensor is stored as (``F8_E4M3`` included)."""
        d = self.derived.get(name)
        return self.stored_dtype(d.sources[0]) if d is not None else self._entry(name).dtype

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.reference}: no tensor named {name}") from None

    def _is_quant_companion(self, name: str) -> bool:
        for suffix in (".scales", ".biases"):
            if name.endswith(suffix):
                return name.removesuffix(suffix) + ".weight" in self.entries
        return False


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.7.mlp...`` → 7), else None."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def natural_key(name: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _what_else(folder: Path) -> str:
    """What a folder without config.json is, for the error: adapters and SAEs are passed here."""
    if (folder / "adapter_config.json").exists():
        return (f"it is a LoRA adapter, not a model: give it with its base as "
                f"BASE+{folder} (mergekit's model+lora)")  # fmt: skip
    if (folder / "cfg.json").exists() and (folder / "sae_weights.safetensors").exists():
        return "it is an SAE folder (SAELens format), not a model: see `mlxmerge sae --help`"
    return "is this a model folder?"


def open_checkpoint(reference: str | os.PathLike, *, check_config: bool = True) -> Checkpoint:
    """Open a folder, a single ``.safetensors`` or ``.gguf`` file or a hub repo id; validate
    before use (GGUF: ``io.gguf_read``, dequantized tensor by tensor, split files included).

    Headers, the index and the shard set are always validated; ``check_config`` also checks
    every tensor's name and shape against what config.json describes (``io.architecture``;
    off only to describe a broken checkpoint, as ``inspect`` does).

    ``base+path/to/adapter`` (mergekit's model+lora) opens ``base`` with a LoRA adapter fused
    into its tensors as they are read (``mlxmerge.lora.fused``)."""
    if "+" in str(reference):
        from mlxmerge.lora.fused import open_fused

        fused = open_fused(str(reference))
        if fused is not None:
            return fused
    path = resolve_reference(reference)
    ref = str(reference)
    gguf = _gguf_files(path)
    if gguf is not None:
        from mlxmerge.io.gguf_read import open_gguf

        ckpt = open_gguf(ref, gguf)
        if check_config:  # the config we rebuilt from the metadata must describe its tensors
            check_architecture(ckpt)
        return ckpt
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file")
        folder, files = path.parent, [path]
        config_path = folder / "config.json"
        config = _read_json(config_path) if config_path.exists() else {}
    else:
        folder = path
        files = _weight_files(folder)
        config_path = folder / "config.json"
        if not config_path.exists():
            raise CheckpointError(f"{folder}: no config.json; {_what_else(folder)}")
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: not a JSON object")
    entries: dict[str, TensorEntry] = {}
    metadata: dict = {}
    for f in files:
        file_entries, meta = read_header(f)
        metadata = metadata or meta
        for name, entry in file_entries.items():
            if name in entries:
                raise CheckpointError(
                    f"{folder}: tensor {name} is in both {entries[name].file.name} and {f.name}"
                )
            entries[name] = entry
    _check_index_matches(folder, entries)
    if not entries:
        raise CheckpointError(f"{path}: holds no tensors")
    config = with_rope_fields(config)  # transformers 5's rope_parameters, where mlx-lm reads them
    quant = config.get("quantization") or config.get("text_config", {}).get("quantization")
    ckpt = Checkpoint(ref, folder, config, entries, files, quant, metadata)
    # Present HF-layout tensors under their MLX names (no data is read).
    view = hf_to_mlx({n: ckpt.shape(n) for n in ckpt.names()}, ckpt.model_type)
    ckpt.derived = {k: d for k, d in view.items() if d.sources != (k,)}
    ckpt.hidden = {s for d in ckpt.derived.values() for s in d.sources}
    ckpt.hidden |= set(ckpt.names()) - set(view)  # buffers mlx-lm drops (GPT-2 attn.bias)
    ckpt._names = None
    if check_config:
        check_architecture(ckpt)
    return ckpt


def _gguf_files(path: Path) -> list[Path] | None:
    """The GGUF file(s) ``path`` names: a .gguf file, or a folder holding one GGUF model and no
    safetensors model (a repo shipping both opens as safetensors)."""
    if path.is_dir() and (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return None
    if path.is_file() and path.suffix != ".gguf":
        return None
    from mlxmerge.io.gguf_file import gguf_files

    return gguf_files(path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot parse JSON ({e})") from None


def _allowed_root(folder: Path) -> Path:
    # Hugging Face cache snapshots are symlinks into the repo's blobs/ folder.
    folder = folder.resolve()
    if folder.parent.name == "snapshots":
        return folder.parent.parent
    return folder


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.exists():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map object")
        root = _allowed_root(folder)
        files = []
        for fname in dict.fromkeys(weight_map.values()):
            if not isinstance(fname, str) or os.path.isabs(fname) or ".." in Path(fname).parts:
                raise CheckpointError(
                    f"{index}: shard path {fname!r} must be a plain relative name"
                )
            f = folder / fname
            if not f.exists():
                raise CheckpointError(f"{index}: shard {fname} does not exist")
            if not f.resolve().is_relative_to(root):
                raise CheckpointError(f"{index}: shard {fname} is a link leading outside {folder}")
            files.append(f)
        _check_shard_set(folder, files, index)
        return files
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors weights found")
    _check_shard_set(folder, files, None)
    root = _allowed_root(folder)
    for f in files:
        if not f.resolve().is_relative_to(root):
            raise CheckpointError(f"{f}: is a link leading outside {folder}")
    return files


# transformers' and mlx-lm's shard names: ``model-00002-of-00004.safetensors``.
_SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<k>\d+)-of-(?P<n>\d+)\.safetensors$")


def _check_shard_set(folder: Path, files: list[Path], index: Path | None) -> None:
    """A ``-of-N`` name promises N shards: refuse a set with some missing (a partial download
    would otherwise open as a model without the missing shards' tensors)."""
    have = {f.name for f in files}
    missing: dict[str, int] = {}  # missing shard name → how many shards its name promises
    for name in sorted(have):
        m = _SHARD_NAME.match(name)
        if m is None:
            continue
        width, n = len(m["k"]), int(m["n"])
        for k in range(1, n + 1):
            sibling = f"{m['stem']}-{k:0{width}d}-of-{m['n']}.safetensors"
            if sibling not in have:
                missing[sibling] = n
    if missing:
        names = list(missing)
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        where = f"{index}: does not list" if index else f"{folder}: missing"
        raise CheckpointError(
            f"{where} {shown} (the shard names promise {max(missing.values())} shards); "
            "the download is incomplete"
        )


def _check_index_matches(folder: Path, entries: dict[str, TensorEntry]) -> None:
    index = folder / INDEX_NAME
    if not index.exists():
        return
    for name, fname in _read_json(index)["weight_map"].items():
        entry = entries.get(name)
        if entry is None or entry.file.name != Path(fname).name:
            raise CheckpointError(
                f"{index}: lists {name} in {fname}, but that shard does not hold it"
            )
