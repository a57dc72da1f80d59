"""LoRA adapters: extract one from a fine-tune, read mlx-lm and PEFT adapters, fuse them on read."""

from mlxmerge.lora.adapter import Adapter, open_adapter
from mlxmerge.lora.extract import extract_lora

__all__ = ["Adapter", "extract_lora", "open_adapter"]
