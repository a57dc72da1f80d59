"""Read LoRA adapter folders (mlx-lm and PEFT) as per-tensor weight deltas.

Both formats store ``ΔW = scale · B A`` in their own orientation; here every LoRA'd weight becomes a
``LoraWeight`` that yields ``ΔW`` in the checkpoint tensor's own (out, in) or (vocab, dim) layout:

* mlx-lm (``mlx_lm/tuner/lora.py``): ``adapters.safetensors`` holds ``<module>.lora_a`` (in, r) and
  ``<module>.lora_b`` (r, out); ``y = W x + scale · (x A) B`` so ``ΔW = scale · (A B)ᵀ``; embeddings
  (``LoRAEmbedding``) store ``lora_a`` (vocab, r), ``lora_b`` (r, dim) with ``ΔW = scale · A B``.
  ``scale`` is ``lora_parameters.scale`` in ``adapter_config.json``.
* PEFT: ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight`` (r, in) and
  ``lora_B.weight`` (out, r); ``ΔW = (lora_alpha / r) · B A`` (``/ √r`` with ``use_rslora``), with
  per-module ``rank_pattern`` / ``alpha_pattern``; ``modules_to_save`` tensors replace the weight, and
  so does a LoRA layer's saved ``base_layer.weight`` (PEFT's default for embeddings), ΔW added on top.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxmerge.errors import CheckpointError
from mlxmerge.io.safetensors_file import read_header
from mlxmerge.io.text import read_text

MLX_WEIGHTS = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraWeight:
    """``ΔW = scale · b @ a`` for the tensor ``name``; ``b``/``a`` are keys in the adapter file,
    transposed first where ``transpose`` says so."""

    name: str  # checkpoint tensor, e.g. model.layers.0.self_attn.q_proj.weight
    b_key: str
    a_key: str
    scale: float
    transpose: bool  # True: b = stored_b.T and a = stored_a.T (mlx-lm linear, PEFT embedding)
    rank: int


@dataclass
class Adapter:
    """An adapter folder: its format, config and the tensors it changes."""

    path: Path
    format: str  # "mlx" | "peft"
    config: dict
    weights: dict[str, LoraWeight]  # by checkpoint tensor name
    replaced: dict[str, str] = field(default_factory=dict)  # tensor name → key (modules_to_save)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # stored key → shape

    @property
    def file(self) -> Path:
        return self.path / (MLX_WEIGHTS if self.format == "mlx" else PEFT_WEIGHTS)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path") or self.config.get("model")

    def delta_shape(self, name: str) -> tuple[int, int]:
        w = self.weights[name]
        b, a = self.shapes[w.b_key], self.shapes[w.a_key]
        return (b[1], a[0]) if w.transpose else (b[0], a[1])

    def delta(self, name: str) -> mx.array:
        """``ΔW`` of tensor ``name`` in float32, lazily (a fresh lazy load per call)."""
        w = self.weights[name]
        arrays = mx.load(str(self.file))
        b, a = arrays[w.b_key].astype(mx.float32), arrays[w.a_key].astype(mx.float32)
        if w.transpose:
            b, a = b.T, a.T
        return w.scale * (b @ a)

    def replacement(self, name: str) -> mx.array:
        return mx.load(str(self.file))[self.replaced[name]]

    def describe(self) -> dict:
        ranks = sorted({w.rank for w in self.weights.values()})
        scales = sorted({w.scale for w in self.weights.values()})
        modules = sorted({_leaf(n) for n in self.weights})
        return {
            "path": str(self.path), "format": self.format, "base_model": self.base_model,
            "tensors": len(self.weights), "modules": modules, "ranks": ranks, "scales": scales,
            "parameters": sum(math.prod(s) for s in self.shapes.values()),
            "replaced": sorted(self.replaced),
        }  # fmt: skip


def _leaf(name: str) -> str:
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


def is_adapter(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG).is_file() and ((p / MLX_WEIGHTS).is_file() or (p / PEFT_WEIGHTS).is_file())


def open_adapter(path: str | Path) -> Adapter:
    """Read an mlx-lm or PEFT adapter folder's config and header (no tensor data)."""
    path = Path(path).expanduser()
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path}: no {CONFIG}; is this a LoRA adapter folder?")
    try:
        config = json.loads(read_text(path / CONFIG, CONFIG, CheckpointError))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / CONFIG}: cannot parse JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / CONFIG}: not a JSON object")
    if (path / MLX_WEIGHTS).is_file() and "peft_type" not in config:
        return _open_mlx(path, config)
    if (path / PEFT_WEIGHTS).is_file():
        return _open_peft(path, config)
    if (path / "adapter_model.bin").is_file():
        raise CheckpointError(
            f"{path}: adapter_model.bin (pickle) is not read; save the adapter as safetensors"
        )
    raise CheckpointError(f"{path}: neither {MLX_WEIGHTS} (mlx-lm) nor {PEFT_WEIGHTS} (PEFT)")


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    entries, _ = read_header(file)
    return {k: e.shape for k, e in entries.items()}


def _open_mlx(path: Path, config: dict) -> Adapter:
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise CheckpointError(
            f"{path}: fine_tune_type {kind!r} is not a LoRA adapter (only 'lora' can be fused)"
        )
    params = config.get("lora_parameters") or {}
    if "scale" not in params:
        raise CheckpointError(f"{path / CONFIG}: lora_parameters.scale is missing")
    shapes = _shapes(path / MLX_WEIGHTS)
    weights = {}
    for key, shape in shapes.items():
        if key.endswith(".lora_b"):
            continue
        if not key.endswith(".lora_a"):
            raise CheckpointError(
                f"{path / MLX_WEIGHTS}: tensor {key} is not a LoRA factor (lora_a/lora_b); "
                "DoRA and full fine-tunes cannot be fused as LoRA"
            )
        module = key.removesuffix(".lora_a")
        b_key = f"{module}.lora_b"
        if b_key not in shapes or len(shape) != 2:
            raise CheckpointError(f"{path / MLX_WEIGHTS}: {key} has no 2-D partner {b_key}")
        embedding = "embed" in module.rsplit(".", 1)[-1]
        weights[f"{module}.weight"] = LoraWeight(
            f"{module}.weight", key if embedding else b_key, b_key if embedding else key,
            float(params["scale"]), not embedding, shape[1],
        )  # fmt: skip
    return Adapter(path, "mlx", config, weights, {}, shapes)


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's get_pattern_key: the first pattern matching a dotted suffix of the module name.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _open_peft(path: Path, config: dict) -> Adapter:
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    # fan_in_fan_out is accepted: PEFT sets it for GPT-2's Conv1D, whose LoRA computes x Aᵀ Bᵀ
    # like a Linear's, so ΔW in Linear orientation (how mlxmerge sees GPT-2) is B A either way.
    if config.get("use_dora"):
        raise CheckpointError(f"{path / CONFIG}: use_dora: true is not supported")
    shapes = _shapes(path / PEFT_WEIGHTS)
    weights, replaced = {}, {}
    for key, shape in shapes.items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{path / PEFT_WEIGHTS}: tensor {key} lacks {PEFT_PREFIX!r}")
        rest = key.removeprefix(PEFT_PREFIX)
        m = re.match(
            r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$", rest
        )
        if m is None:
            if ".lora_" in rest or "lora_magnitude" in rest:
                raise CheckpointError(f"{path / PEFT_WEIGHTS}: unsupported LoRA tensor {key}")
            # A modules_to_save tensor, stored whole; or the base weight under a LoRA layer
            # (``embed_tokens.base_layer.weight``, saved with embedding LoRAs), which PEFT loads
            # over the base's before adding ΔW.
            replaced[rest.replace(".base_layer.", ".")] = key
            continue
        module, part = m.groups()
        if part in ("lora_B", "lora_embedding_B"):
            continue
        embedding = part == "lora_embedding_A"
        a_key = key
        b_key = key.replace(".lora_A", ".lora_B").replace(".lora_embedding_A", ".lora_embedding_B")
        if b_key not in shapes:
            raise CheckpointError(f"{path / PEFT_WEIGHTS}: {key} has no partner {b_key}")
        r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        if shape[0] != r:
            raise CheckpointError(
                f"{path / PEFT_WEIGHTS}: {key} has rank {shape[0]} but the config says r={r}"
            )
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        # PEFT embeddings: ΔW (vocab, dim) = scale · Aᵀ Bᵀ; linear: ΔW (out, in) = scale · B A.
        weights[f"{module}.weight"] = (
            LoraWeight(f"{module}.weight", a_key, b_key, scale, True, r)
            if embedding
            else LoraWeight(f"{module}.weight", b_key, a_key, scale, False, r)
        )
    return Adapter(path, "peft", config, weights, replaced, shapes)
