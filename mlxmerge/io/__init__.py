"""Open checkpoints lazily and write model folders atomically."""

from mlxmerge.io.checkpoint import Checkpoint, layer_index, open_checkpoint
from mlxmerge.io.model_folder import ModelCard, Quantization, write_model
from mlxmerge.io.writer import ShardedWriter, TensorSpec, human_bytes, parse_size

__all__ = [
    "Checkpoint", "ModelCard", "Quantization", "ShardedWriter", "TensorSpec",
    "human_bytes", "layer_index", "open_checkpoint", "parse_size", "write_model",
]  # fmt: skip
