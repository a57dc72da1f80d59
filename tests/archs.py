"""Tiny random models of many mlx-lm architectures, for the architecture matrix tests.

``ARCHS`` maps a name to a small config.json (hidden 32, 4 layers, vocab 300) carrying the
fields both mlx-lm and transformers read, so one folder loads in either. ``build_arch`` builds
the model with mlx-lm's own class (seeded random weights) and writes it in MLX layout (what
mlx-lm's ``sanitize`` + save produce) or in Hugging Face layout (what transformers saves),
the latter through mlxmerge's HF-layout writer, which the transformers tests check.

    from archs import ARCHS, build_arch, build_arch_tokenizer  # tests/ is on sys.path under pytest
    tok = build_arch_tokenizer(tmp / "tok")
    path = build_arch("gpt2", tmp / "gpt2", tok, layout="hf")
"""

from __future__ import annotations  # noqa: I001  (mlxmerge must precede mlx.core)

import copy
import importlib
from pathlib import Path

import mlxmerge  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten

from mlxmerge.io.model_folder import ModelCard, write_model

VOCAB = 300  # the byte-level tokenizer below has 256 bytes + 4 specials + 40 merges
HIDDEN = 32
LAYERS = 4
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8

_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "intermediate_size": 64,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 3,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}


def _cfg(model_type: str, architecture: str, **over) -> dict:
    return {"model_type": model_type, "architectures": [architecture], **_COMMON, **over}


_GELU = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}
_GRANITE = {
    "logits_scaling": 2.0, "attention_multiplier": 0.125, "embedding_multiplier": 4.0,
    "residual_multiplier": 0.5, "attention_bias": False, "mlp_bias": False,
}  # fmt: skip
_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}

# name → config.json. Names are model_types, plus a suffix where one type appears twice.
ARCHS: dict[str, dict] = {
    "llama": _cfg("llama", "LlamaForCausalLM"),
    "mistral": _cfg("mistral", "MistralForCausalLM", sliding_window=None),
    "qwen2": _cfg("qwen2", "Qwen2ForCausalLM", tie_word_embeddings=True),
    "qwen2_untied": _cfg("qwen2", "Qwen2ForCausalLM"),
    "qwen3": _cfg("qwen3", "Qwen3ForCausalLM", tie_word_embeddings=True),
    "qwen3_moe": _cfg(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=32,
        norm_topk_prob=True,
    ),
    "mixtral": _cfg("mixtral", "MixtralForCausalLM", **_MOE),
    # mlx-lm's gemma and starcoder2 use the exact GELU (gemma2/3: the tanh form)
    "gemma": _cfg(
        "gemma",
        "GemmaForCausalLM",
        tie_word_embeddings=True,
        hidden_act="gelu",
        hidden_activation="gelu",
    ),
    "gemma2": _cfg(
        "gemma2",
        "Gemma2ForCausalLM",
        tie_word_embeddings=True,
        query_pre_attn_scalar=8,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        sliding_window=128,
        **_GELU,
    ),
    "gemma3_text": _cfg(
        "gemma3_text",
        "Gemma3ForCausalLM",
        hidden_size=64,  # mlx-lm rounds sqrt(hidden) to bf16: exact for 64, not for 32
        tie_word_embeddings=True,
        query_pre_attn_scalar=8,
        sliding_window=512,
        sliding_window_pattern=2,
        rope_local_base_freq=10000.0,
        layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        **_GELU,
    ),
    "phi3": _cfg(
        "phi3", "Phi3ForCausalLM", num_key_value_heads=HEADS, original_max_position_embeddings=256
    ),
    "phimoe": _cfg(
        "phimoe",
        "PhiMoEForCausalLM",
        rope_scaling=None,
        router_jitter_noise=0.0,
        input_jitter_noise=0.0,
        attention_bias=True,  # mlx-lm's phimoe always has these biases
        lm_head_bias=True,
        original_max_position_embeddings=256,
        **_MOE,
    ),
    "gpt2": {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": VOCAB,
        "n_embd": HIDDEN,
        "n_layer": LAYERS,
        "n_head": HEADS,
        "n_positions": 256,
        "n_ctx": 256,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "bos_token_id": 1,
        "eos_token_id": 3,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    },
    "starcoder2": _cfg(
        "starcoder2",
        "Starcoder2ForCausalLM",
        tie_word_embeddings=True,
        norm_epsilon=1e-5,
        use_bias=True,
        hidden_act="gelu",
        sliding_window=None,
    ),
    "olmo2": _cfg("olmo2", "Olmo2ForCausalLM"),
    "granite": _cfg("granite", "GraniteForCausalLM", tie_word_embeddings=True, **_GRANITE),
    "granitemoe": _cfg(
        "granitemoe", "GraniteMoeForCausalLM", tie_word_embeddings=True, **_GRANITE, **_MOE
    ),
    "cohere": _cfg(
        "cohere",
        "CohereForCausalLM",
        tie_word_embeddings=True,
        layer_norm_eps=1e-5,
        logit_scale=0.25,
        use_qk_norm=False,
        attention_bias=False,
    ),
    "deepseek_v2": _cfg(
        "deepseek_v2",
        "DeepseekV2ForCausalLM",
        moe_intermediate_size=32,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        routed_scaling_factor=1.0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        v_head_dim=8,
        qk_nope_head_dim=8,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        moe_layer_freq=1,
        first_k_dense_replace=1,
        num_key_value_heads=HEADS,
        norm_topk_prob=False,
        scoring_func="softmax",
        # yarn with factor 1 is plain RoPE; mlx-lm's deepseek_v2 requires the dict
        rope_scaling={
            "type": "yarn",
            "rope_type": "yarn",
            "factor": 1.0,
            "original_max_position_embeddings": 256,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.0,
        },
    ),
    # more families mlx-community publishes widely
    "phi": _cfg(
        "phi",
        "PhiForCausalLM",
        num_key_value_heads=HEADS,
        partial_rotary_factor=0.5,
        layer_norm_eps=1e-5,
        hidden_act="gelu_new",
    ),
    "qwen2_moe": _cfg(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=False,
    ),
    "olmoe": _cfg("olmoe", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2),
    "stablelm": _cfg(
        "stablelm",
        "StableLmForCausalLM",
        use_qkv_bias=True,
        partial_rotary_factor=0.5,
        layer_norm_eps=1e-5,
    ),
    "smollm3": _cfg(
        "smollm3", "SmolLM3ForCausalLM", tie_word_embeddings=True, no_rope_layer_interval=2
    ),
    "glm4": _cfg(
        "glm4",
        "Glm4ForCausalLM",
        attention_bias=True,
        partial_rotary_factor=0.5,
    ),
    "seed_oss": _cfg(
        "seed_oss", "SeedOssForCausalLM", tie_word_embeddings=True, attention_bias=True
    ),
    "ernie4_5": _cfg("ernie4_5", "Ernie4_5ForCausalLM", use_bias=False, tie_word_embeddings=True),
}

# Which of ARCHS store experts (their HF layout differs from MLX layout beyond renames).
MOE_ARCHS = ("qwen3_moe", "mixtral", "phimoe", "granitemoe", "deepseek_v2", "qwen2_moe", "olmoe")


def arch_config(name: str) -> dict:
    """A deep copy of ``ARCHS[name]`` (tests may edit it)."""
    return copy.deepcopy(ARCHS[name])


def build_arch_tokenizer(folder: str | Path) -> Path:
    """A byte-level BPE tokenizer with a 300-token vocabulary (ChatML template)."""
    from mlxmerge.demo.tiny import build_tokenizer

    return build_tokenizer(folder, vocab_size=VOCAB)


def arch_weights(name: str, seed: int = 0) -> dict[str, mx.array]:
    """MLX-layout weights of a seeded random ``name`` model, built with mlx-lm's own class.

    Norm weights are jittered around their init (ones/zeros) so that a swapped or dropped norm
    changes the logits; everything is float32.
    """
    from mlx_lm.utils import MODEL_REMAPPING

    config = ARCHS[name]
    model_type = MODEL_REMAPPING.get(config["model_type"], config["model_type"])
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    keys = mx.random.split(mx.random.key(seed + 12345), len(weights))
    out = {}
    for i, (k, v) in enumerate(sorted(weights.items())):
        if v.ndim == 1:  # norms and biases: not constant, so each one matters
            v = v + 0.1 * mx.random.normal(v.shape, key=keys[i])
        out[k] = v.astype(mx.float32)
    if config.get("tie_word_embeddings", True):
        out.pop("lm_head.weight", None)
    mx.eval(out)
    return out


def build_arch(
    name: str, path: str | Path, tokenizer: str | Path | None = None, *, layout: str = "mlx",
    dtype: mx.Dtype = mx.float32, seed: int = 0, perturb: float = 0.0, force: bool = False,
) -> Path:  # fmt: skip
    """Write a tiny ``name`` model folder in ``layout`` ("mlx" or "hf") and return its path.

    ``perturb`` > 0 adds seeded noise of that relative size to every tensor (a 'fine-tune' of
    the ``seed`` model: same seed, different ``perturb``/``seed + 1`` noise gives a family).
    """
    weights = arch_weights(name, seed)
    if perturb:
        keys = mx.random.split(mx.random.key(seed * 7919 + int(perturb * 1e6)), len(weights))
        weights = {
            k: v + perturb * mx.abs(v).mean() * mx.random.normal(v.shape, key=keys[i])
            for i, (k, v) in enumerate(sorted(weights.items()))
        }
    names = sorted(weights)
    plan = [(n, tuple(weights[n].shape)) for n in names]
    card = ModelCard(f"tiny {name} (seed {seed})")
    return write_model(
        path, plan, lambda n: weights[n], config=ARCHS[name], card=card, dtype=dtype,
        layout=layout, tokenizer_source=Path(tokenizer) if tokenizer else None, force=force,
        shard_size=1 << 30,
    )  # fmt: skip
