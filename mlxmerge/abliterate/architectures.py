"""Which weights write to the residual stream, per ``model_type``: data, not subclasses.

A writer is a module path inside a decoder layer, found by its role (attention output, MLP or
expert output), never by comparing shapes. Weights are stored ``(..., d_model, d_in)``
(``nn.Linear`` layout; stacked experts add a leading axis), so the residual side is axis -2.
Post-norm blocks (Gemma 2/3, OLMo 2) pass the sublayer output through an RMSNorm before the
residual add; ``post_norm`` names that norm and ``gain_offset`` says whether its gain is
``weight`` (0) or ``1 + weight`` (1, Gemma).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlxmerge.errors import MlxmergeError


@dataclass(frozen=True)
class Writer:
    """One module that adds its output to the residual stream."""

    pattern: str  # regex for the module path inside a layer, e.g. r"self_attn\.o_proj"
    component: str  # "attn" or "mlp": which weight kernel applies (heretic-style search)
    post_norm: str | None = None  # module path of a norm between it and the residual add


ATTN = Writer(r"self_attn\.o_proj", "attn")
MLP = Writer(r"mlp\.down_proj", "mlp")
MOE = (
    Writer(r"mlp\.switch_mlp\.down_proj", "mlp"),  # MLX stacked experts (E, d_model, d_ff)
    Writer(r"mlp\.experts\.\d+\.down_proj", "mlp"),  # HF per-expert tensors
    Writer(r"mlp\.shared_experts?\.down_proj", "mlp"),
)
MIXTRAL = (
    Writer(r"block_sparse_moe\.switch_mlp\.down_proj", "mlp"),
    Writer(r"block_sparse_moe\.experts\.\d+\.w2", "mlp"),  # HF Mixtral, PhiMoE
    Writer(r"block_sparse_moe\.output_linear", "mlp"),  # HF GraniteMoE: fused (E, d_model, d_ff)
)
GEMMA_POST = (
    Writer(r"self_attn\.o_proj", "attn", "post_attention_layernorm"),
    Writer(r"mlp\.down_proj", "mlp", "post_feedforward_layernorm"),
)

GLM4_POST = (
    Writer(r"self_attn\.o_proj", "attn", "post_self_attn_layernorm"),
    Writer(r"mlp\.down_proj", "mlp", "post_mlp_layernorm"),
)


@dataclass(frozen=True)
class Architecture:
    writers: tuple[Writer, ...]
    gain_offset: float = 0.0  # RMSNorm gain is gain_offset + weight
    embedding: str = "embed_tokens"


STANDARD = Architecture((ATTN, MLP))

ARCHITECTURES: dict[str, Architecture] = {
    "llama": STANDARD,
    "mistral": STANDARD,
    "qwen2": STANDARD,
    "qwen3": STANDARD,
    "phi3": STANDARD,
    "gemma": STANDARD,
    "granite": STANDARD,
    "olmo2": Architecture(GEMMA_POST),
    "gemma2": Architecture(GEMMA_POST, gain_offset=1.0),
    "gemma3": Architecture(GEMMA_POST, gain_offset=1.0),
    "gemma3_text": Architecture(GEMMA_POST, gain_offset=1.0),
    "qwen2_moe": Architecture((ATTN, MLP, *MOE)),
    "qwen3_moe": Architecture((ATTN, MLP, *MOE)),
    "mixtral": Architecture((ATTN, *MIXTRAL)),
    "phimoe": Architecture((ATTN, *MIXTRAL)),
    "granitemoe": Architecture((ATTN, *MIXTRAL)),
    "cohere": STANDARD,  # parallel block: both writers add to the same residual
    "starcoder2": Architecture((ATTN, Writer(r"mlp\.c_proj", "mlp"))),
    "deepseek_v2": Architecture((ATTN, MLP, *MOE)),  # dense first layers, then experts
    "deepseek_v3": Architecture((ATTN, MLP, *MOE)),
    "olmoe": Architecture((ATTN, *MOE)),
    "stablelm": STANDARD,
    "smollm3": STANDARD,
    "seed_oss": STANDARD,
    "ernie4_5": STANDARD,
    "phi": Architecture((Writer(r"self_attn\.dense", "attn"), Writer(r"mlp\.fc2", "mlp"))),
    "glm4": Architecture(GLM4_POST),
    # Names are mlxmerge's canonical (MLX) ones: HF GPT-2's transposed Conv1D weights are read
    # and written through mlxmerge.io.layout, so W is (d_model, d_in) here as for Linear.
    "gpt2": Architecture(
        (Writer(r"attn\.c_proj", "attn"), Writer(r"mlp\.c_proj", "mlp")), embedding="wte"
    ),
}

_LAYER = re.compile(
    r"^(?P<prefix>(?:.*\.)?(?:layers|h)\.(?P<layer>\d+))\.(?P<module>.+)\.(?P<kind>weight|bias)$"
)


def architecture(model_type: str | None) -> Architecture:
    """The residual-writer entry for ``model_type``; a clear error when there is none."""
    if model_type not in ARCHITECTURES:
        raise MlxmergeError(
            f"abliterate does not support model_type {model_type!r}: no residual-writer entry "
            f"(known: {', '.join(sorted(ARCHITECTURES))}; add one to "
            "mlxmerge.abliterate.architectures)"
        )
    return ARCHITECTURES[model_type]


@dataclass(frozen=True)
class WriterTensor:
    name: str  # full tensor name
    layer: int
    writer: Writer
    norm_weight: str | None  # full name of the post-norm weight, if any


def writer_tensors(names: list[str], arch: Architecture) -> list[WriterTensor]:
    """The weights and biases of every residual writer among ``names``, in order."""
    out = []
    for name in names:
        m = _LAYER.match(name)
        if not m:
            continue
        for w in arch.writers:
            if re.fullmatch(w.pattern, m["module"]):
                norm = f"{m['prefix']}.{w.post_norm}.weight" if w.post_norm else None
                out.append(WriterTensor(name, int(m["layer"]), w, norm))
                break
    return out


def embedding_tensor(names: list[str], arch: Architecture) -> str | None:
    for name in names:
        if name.endswith(f"{arch.embedding}.weight") and "layers." not in name:
            return name
    return None
