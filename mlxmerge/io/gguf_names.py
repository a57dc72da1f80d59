"""GGUF ↔ mlxmerge (MLX layout) naming, both ways: tensor names, Q/K permutation, config fields.

One table for the reader (``gguf_read``) and the writer (``gguf_write``). What is data here:

- ``GGUF_ARCH``: mlx-lm ``model_type`` → llama.cpp architecture (``general.architecture``).
- ``BLOCK_MODULES``: per ``model_type``, the modules of one decoder layer as mlx-lm names them
  (``self_attn.q_proj``), each with the Hugging Face name that ``gguf``'s own ``TensorNameMap``
  knows (they differ only for stacked MoE experts: mlx-lm's ``switch_mlp`` vs HF's ``experts``).
  The GGUF name (``blk.{bid}.attn_q``) always comes from ``gguf.get_tensor_name_map``.
- ``CONFIG_KEYS``: GGUF metadata key (without the ``{arch}.`` prefix) ↔ config.json field.

Transforms llama.cpp's converter (``convert_hf_to_gguf.py``) applies and a reader must undo:
``LlamaModel.permute`` of the Q and K rows (llama, mistral, mixtral: all written as ``llama``),
and ``+1`` on Gemma's RMSNorm weights (Gemma stores ``w`` for ``x * (1 + w)``; llama.cpp
multiplies by the stored value). Sources: llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel``,
``GemmaModel``, ``Gemma2Model``, ``Gemma3Model``); transformers ``modeling_gguf_pytorch_utils``.
"""

from __future__ import annotations

from functools import cache

import gguf

from mlxmerge.errors import CheckpointError

# mlx-lm model_type → GGUF general.architecture.
GGUF_ARCH = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama",
    "qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
    "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
}  # fmt: skip

# GGUF architecture → the model_type a file of it becomes (llama with experts: mixtral).
MODEL_TYPE = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text",
    "phi3": "phi3",
}  # fmt: skip

# transformers' architecture class per model_type (config.json "architectures").
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
}  # fmt: skip

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")
_QK_NORM = ("self_attn.q_norm", "self_attn.k_norm")
_GEMMA2_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def _same(*names: str) -> tuple[tuple[str, str], ...]:
    return tuple((n, n) for n in names)


def _switch(moe: str, hf_experts: str, projs: dict[str, str]) -> tuple[tuple[str, str], ...]:
    # mlx-lm stacks experts under switch_mlp; gguf's map knows HF's merged-experts names.
    return tuple((f"{moe}.switch_mlp.{p}", f"{moe}.{hf_experts}.{hf}") for p, hf in projs.items())


_QWEN_EXPERTS = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}

# Per model_type: (mlx-lm module under model.layers.{bid}, HF module name gguf's map knows).
BLOCK_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    "llama": _same(*_ATTN, *_MLP, *_NORMS),
    "mistral": _same(*_ATTN, *_MLP, *_NORMS),
    "qwen2": _same(*_ATTN, *_MLP, *_NORMS),
    "qwen3": _same(*_ATTN, *_QK_NORM, *_MLP, *_NORMS),
    "mixtral": _same(*_ATTN, *_NORMS, "block_sparse_moe.gate")
    + _switch("block_sparse_moe", "experts", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
    "qwen2_moe": _same(*_ATTN, *_NORMS, "mlp.gate", "mlp.shared_expert_gate")
    + _same("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")
    + _switch("mlp", "experts", _QWEN_EXPERTS),
    "qwen3_moe": _same(*_ATTN, *_QK_NORM, *_NORMS, "mlp.gate")
    + _switch("mlp", "experts", _QWEN_EXPERTS),
    "gemma": _same(*_ATTN, *_MLP, *_NORMS),
    "gemma2": _same(*_ATTN, *_MLP, *_NORMS, *_GEMMA2_NORMS),
    "gemma3_text": _same(*_ATTN, *_QK_NORM, *_MLP, *_NORMS, *_GEMMA2_NORMS),
    "phi3": _same("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj", *_NORMS),
}  # fmt: skip

# Outside the layers: the same for every architecture here.
GLOBAL_MODULES = (("model.embed_tokens", "model.embed_tokens"), ("model.norm", "model.norm"),
                  ("lm_head", "lm_head"))  # fmt: skip

# GGUF tensors with no MLX counterpart: llama.cpp derives them from the config (rope scaling).
SKIPPED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

# model_types whose Q/K rows llama.cpp permutes (its LlamaModel.permute).
PERMUTED = {"llama", "mistral", "mixtral"}
# model_types whose RMSNorm weights GGUF stores as 1 + w.
NORM_SHIFT = {"gemma", "gemma2", "gemma3_text"}
# MLX name suffix → the MLX shape has a leading 1 that GGUF drops (Qwen2-MoE shared_expert_gate).
LEADING_ONE = ("mlp.shared_expert_gate.weight",)


def supported_model_types() -> list[str]:
    return sorted(BLOCK_MODULES)


def gguf_arch(model_type: str | None) -> str:
    """The GGUF architecture for ``model_type``; CheckpointError naming the supported ones."""
    arch = GGUF_ARCH.get(model_type or "")
    if arch is None:
        raise CheckpointError(
            f"GGUF output does not support model_type {model_type!r}; supported: "
            f"{', '.join(supported_model_types())}"
        )
    return arch


def model_type_of(arch: str, expert_count: int = 0) -> str | None:
    """The mlx-lm model_type of a GGUF file's architecture (None: not supported)."""
    if arch == "llama" and expert_count:
        return "mixtral"
    return MODEL_TYPE.get(arch)


def _arch_enum(arch: str) -> gguf.MODEL_ARCH:
    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return enum
    raise CheckpointError(f"gguf has no architecture named {arch!r}")


@cache
def mlx_to_gguf_map(model_type: str, n_blocks: int) -> dict[str, str]:
    """``{mlx_name: gguf_name}`` for every tensor (``.weight`` and ``.bias``) the architecture may hold.

    Names come from ``gguf.get_tensor_name_map`` (llama.cpp's own table) looked up with the HF
    name of each mlx-lm module; an entry gguf does not know is an error in this table.
    """
    table = gguf.get_tensor_name_map(_arch_enum(gguf_arch(model_type)), n_blocks)
    modules = [*GLOBAL_MODULES]
    for bid in range(n_blocks):
        for mlx, hf in BLOCK_MODULES[model_type]:
            modules.append((f"model.layers.{bid}.{mlx}", f"model.layers.{bid}.{hf}"))
    out = {}
    for mlx, hf in modules:
        name = table.get_name(hf)
        if name is None and (mlx, hf) in GLOBAL_MODULES:
            continue  # gemma's GGUF has no output tensor: always tied
        if name is None:
            raise AssertionError(f"gguf's tensor map for {model_type} does not know {hf}")
        for suffix in (".weight", ".bias"):
            out[mlx + suffix] = name + suffix
    return out


@cache
def gguf_to_mlx_map(model_type: str, n_blocks: int) -> dict[str, str]:
    """``{gguf_name: mlx_name}``, the inverse of ``mlx_to_gguf_map``."""
    return {g: m for m, g in mlx_to_gguf_map(model_type, n_blocks).items()}


# -- transforms on the tensor data (numpy or MLX arrays: both have reshape/swapaxes) ------------


def _q_or_k(name: str) -> str | None:
    for kind in ("q", "k"):
        if name.endswith((f"self_attn.{kind}_proj.weight", f"self_attn.{kind}_proj.bias")):
            return kind
    return None


def permute_heads(model_type: str, mlx_name: str) -> int | None:
    """For a permuted Q/K tensor, which head count to use: 0 for Q (num_attention_heads),
    1 for K (num_key_value_heads); None when the tensor is stored unpermuted."""
    if model_type not in PERMUTED:
        return None
    kind = _q_or_k(mlx_name)
    return None if kind is None else (0 if kind == "q" else 1)


def permute(w, n_head: int, n_head_kv: int | None = None):
    """HF → GGUF row order of Q/K (llama.cpp ``LlamaModel.permute``): within each head, the
    rotary pairs go from (first half, second half) to interleaved. ``w``: (rows, ...)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute(w, n_head: int, n_head_kv: int | None = None):
    """GGUF → HF row order of Q/K: the inverse of ``permute`` (transformers' ``reverse_permute``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(2, 1).reshape(shape)


def norm_shifted(model_type: str, mlx_name: str) -> bool:
    """True when GGUF stores this tensor as ``1 + w`` (Gemma's RMSNorm weights)."""
    return model_type in NORM_SHIFT and mlx_name.endswith("norm.weight")


def leading_one(mlx_name: str) -> bool:
    """True when the MLX tensor is (1, n) but GGUF stores it as (n,)."""
    return mlx_name.endswith(LEADING_ONE)


# -- metadata ↔ config.json -----------------------------------------------------------------

# (GGUF key without "{arch}.", config.json field, value type). The reader maps what is present;
# the writer writes what the config has.
_U32, _F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
CONFIG_KEYS: tuple[tuple[str, str, gguf.GGUFValueType], ...] = (
    ("context_length", "max_position_embeddings", _U32),
    ("embedding_length", "hidden_size", _U32),
    ("block_count", "num_hidden_layers", _U32),
    ("feed_forward_length", "intermediate_size", _U32),
    ("attention.head_count", "num_attention_heads", _U32),
    ("attention.head_count_kv", "num_key_value_heads", _U32),
    ("attention.key_length", "head_dim", _U32),
    # llama.cpp defaults the value head size to hidden / heads, not to key_length (gguf_write).
    ("attention.value_length", "head_dim", _U32),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps", _F32),
    ("rope.freq_base", "rope_theta", _F32),
    ("attention.sliding_window", "sliding_window", _U32),
    ("attn_logit_softcapping", "attn_logit_softcapping", _F32),
    ("final_logit_softcapping", "final_logit_softcapping", _F32),
    ("expert_used_count", "num_experts_per_tok", _U32),
    ("expert_feed_forward_length", "moe_intermediate_size", _U32),
    ("expert_shared_feed_forward_length", "shared_expert_intermediate_size", _U32),
    ("vocab_size", "vocab_size", _U32),
)
# The expert count's config name differs per model_type.
EXPERT_COUNT_FIELD = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts",
                      "qwen3_moe": "num_experts"}  # fmt: skip
TOKEN_ID_KEYS = (
    ("tokenizer.ggml.bos_token_id", "bos_token_id"),
    ("tokenizer.ggml.eos_token_id", "eos_token_id"),
    ("tokenizer.ggml.padding_token_id", "pad_token_id"),
)


def config_from_metadata(
    arch: str, fields: dict[str, object], tensor_names: set[str], n_vocab: int | None
) -> dict:
    """config.json (transformers / mlx-lm fields) from GGUF metadata ``fields`` (key → value).

    ``tensor_names`` are the GGUF tensor names (``output.weight`` absent: tied embeddings);
    ``n_vocab`` is the embedding's row count (the vocab size when the metadata lacks it).
    Raises CheckpointError for an architecture this table does not support.
    """
    model_type = model_type_of(arch, int(fields.get(f"{arch}.expert_count", 0) or 0))
    if model_type is None:
        raise CheckpointError(
            f"GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(MODEL_TYPE))} (llama with experts reads as mixtral)"
        )
    config: dict = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type}
    for key, field, _ in CONFIG_KEYS:
        value = fields.get(f"{arch}.{key}")
        if value is not None:
            config[field] = value
    expert_count = fields.get(f"{arch}.expert_count")
    if expert_count:
        config[EXPERT_COUNT_FIELD.get(model_type, "num_experts")] = expert_count
    if "vocab_size" not in config and n_vocab is not None:
        config["vocab_size"] = n_vocab
    if "num_key_value_heads" not in config and "num_attention_heads" in config:
        config["num_key_value_heads"] = config["num_attention_heads"]
    rope_dims = fields.get(f"{arch}.rope.dimension_count")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if rope_dims and heads and hidden:
        head_dim = config.get("head_dim") or hidden // heads
        if model_type in PERMUTED and "head_dim" not in config and rope_dims != head_dim:
            config["head_dim"] = rope_dims  # llama's converter writes head_dim here
        elif model_type == "phi3" and rope_dims != head_dim:
            config["partial_rotary_factor"] = rope_dims / head_dim  # Phi-4-mini rotates 3/4
    if heads and hidden:  # llama.cpp's default key length; mlx-lm's differs per class (gemma3: 256)
        config.setdefault("head_dim", hidden // heads)
    scaling = fields.get(f"{arch}.rope.scaling.type")
    if scaling in ("linear", "yarn") and fields.get(f"{arch}.rope.scaling.factor"):
        config["rope_scaling"] = {"rope_type": scaling, "type": scaling,
                                  "factor": fields[f"{arch}.rope.scaling.factor"]}  # fmt: skip
        original = fields.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    for key, field in TOKEN_ID_KEYS:
        if fields.get(key) is not None:
            config[field] = fields[key]
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    if model_type == "qwen3_moe":
        config.setdefault("norm_topk_prob", True)  # llama.cpp's qwen3moe always renormalizes
        config.setdefault("decoder_sparse_step", 1)  # and has experts in every block
        config.setdefault("mlp_only_layers", [])
    if model_type in ("gemma2", "gemma3_text") and config.get("head_dim"):
        # llama.cpp scales queries by 1/sqrt(head_dim) (mlx-lm's default scalar is 144 or 256).
        config.setdefault("query_pre_attn_scalar", config["head_dim"])
    return config


def metadata_from_config(config: dict) -> list[tuple[str, object, gguf.GGUFValueType]]:
    """The ``{arch}.*`` metadata (key, value, type) llama.cpp reads, from a config.json dict.

    Raises CheckpointError for a model_type with no GGUF architecture here.
    """
    cfg = config.get("text_config", config) if "num_hidden_layers" not in config else config
    model_type = cfg.get("model_type") or config.get("model_type")
    arch = gguf_arch(model_type)
    out: list[tuple[str, object, gguf.GGUFValueType]] = []
    for key, field, vtype in CONFIG_KEYS:
        value = cfg.get(field)
        if value is None or isinstance(value, (list, dict)):
            continue
        out.append((f"{arch}.{key}", float(value) if vtype == _F32 else int(value), vtype))
    if "rope_theta" not in cfg:  # transformers 5 keeps it under rope_parameters
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None:
            out.append((f"{arch}.rope.freq_base", float(theta), _F32))
    if "num_key_value_heads" not in cfg and "num_attention_heads" in cfg:
        out.append((f"{arch}.attention.head_count_kv", int(cfg["num_attention_heads"]), _U32))
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    head_dim = cfg.get("head_dim") or (hidden // heads if heads and hidden else None)
    if head_dim:  # the rotated part of each head (Phi-4-mini: partial_rotary_factor 0.75)
        rotated = int(head_dim * float(cfg.get("partial_rotary_factor") or 1.0))
        out.append((f"{arch}.rope.dimension_count", rotated, _U32))
    field = EXPERT_COUNT_FIELD.get(model_type)
    if field and cfg.get(field):
        out.append((f"{arch}.expert_count", int(cfg[field]), _U32))
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("linear", "yarn") and scaling.get("factor"):
        out.append((f"{arch}.rope.scaling.type", kind, gguf.GGUFValueType.STRING))
        out.append((f"{arch}.rope.scaling.factor", float(scaling["factor"]), _F32))
        if scaling.get("original_max_position_embeddings"):
            out.append((f"{arch}.rope.scaling.original_context_length",
                        int(scaling["original_max_position_embeddings"]), _U32))  # fmt: skip
    return out
