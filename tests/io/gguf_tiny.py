"""Tiny GGUF files written with ``gguf.GGUFWriter`` (llama.cpp's own writer) for the read tests.

Tensors get GGUF names from ``gguf``'s tensor map, data from a seeded generator; quantized
types gguf can quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) go through ``gguf.quants.quantize``; the
others (K-quants, IQ types) get random bytes with their f16 scale fields set to small finite
values, which is a valid block for any decoder.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

T = gguf.GGMLQuantizationType
# Byte offsets of the f16 scale fields inside one block of the types written from random bytes.
F16_FIELDS = {
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,),
    T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,),
}  # fmt: skip
QUANTIZABLE = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}

ARCH = {"llama": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma2": "gemma2",
        "gemma3_text": "gemma3", "phi3": "phi3"}  # fmt: skip

GPT2_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t"]
SPM_PIECES = ["▁the", "▁a", "he", "in", "er", "on", "▁t", "▁s", "at", "re", "▁", "e", "t", "h",
              "a", "n", "r", "o", "s", "i", "  ", "   "]  # fmt: skip


def tensor_data(rng: np.random.Generator, shape: tuple[int, ...], qtype: T) -> np.ndarray:
    """Data for one tensor of ``qtype``: float arrays for F32/F16, bytes for the rest."""
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if qtype == T.F32:
        return w
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype == T.BF16 or qtype in QUANTIZABLE:
        return gguf.quants.quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = rng.uniform(1e-3, 1e-2, n_blocks).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def shapes(model_type: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name → numpy-order shape for a tiny model."""
    h, ff, v = cfg["hidden"], cfg["ff"], cfg["vocab"]
    hd = cfg.get("head_dim", h // cfg["heads"])
    q, kv = cfg["heads"] * hd, cfg["kv_heads"] * hd
    out = {"token_embd.weight": (v, h), "output_norm.weight": (h,)}
    if not cfg.get("tied"):
        out["output.weight"] = (v, h)
    for b in range(cfg["layers"]):
        p = f"blk.{b}."
        out[p + "attn_norm.weight"] = (h,)
        out[p + "ffn_norm.weight"] = (h,)
        out[p + "attn_output.weight"] = (h, q)
        if model_type == "phi3":
            out[p + "attn_qkv.weight"] = (q + 2 * kv, h)
            out[p + "ffn_up.weight"] = (2 * ff, h)
            out[p + "ffn_down.weight"] = (h, ff)
            continue
        out[p + "attn_q.weight"] = (q, h)
        out[p + "attn_k.weight"] = (kv, h)
        out[p + "attn_v.weight"] = (kv, h)
        if model_type == "qwen2":
            out.update(
                {p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)}
            )
        if model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
            out.update({p + "attn_q_norm.weight": (hd,), p + "attn_k_norm.weight": (hd,)})
        if model_type in ("gemma2", "gemma3_text"):
            out.update({p + "post_attention_norm.weight": (h,), p + "post_ffw_norm.weight": (h,)})
        if model_type in ("mixtral", "qwen3_moe", "qwen2_moe"):
            e = cfg["experts"]
            out[p + "ffn_gate_inp.weight"] = (e, h)
            out[p + "ffn_gate_exps.weight"] = (e, ff, h)
            out[p + "ffn_up_exps.weight"] = (e, ff, h)
            out[p + "ffn_down_exps.weight"] = (e, h, ff)
        else:
            out[p + "ffn_gate.weight"] = (ff, h)
            out[p + "ffn_up.weight"] = (ff, h)
            out[p + "ffn_down.weight"] = (h, ff)
    return out


def write_gguf(
    path: Path, model_type: str = "llama", *, qtype: T = T.Q8_0, types: dict[str, T] | None = None,
    tokenizer: str = "gpt2", seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4,
    kv_heads: int = 2, ff: int = 128, vocab: int | None = None, experts: int = 4,
    head_dim: int | None = None, tied: bool = False, chat_template: str | None = None,
    extra: dict | None = None, split_max_tensors: int = 0,
) -> Path:  # fmt: skip
    """Write a tiny ``model_type`` GGUF; 2-D weights are ``qtype`` unless ``types`` names the
    tensor (by GGUF name suffix, e.g. ``"attn_q.weight"``); 1-D tensors are F32 as llama.cpp
    writes them. Returns ``path``."""
    rng = np.random.default_rng(seed)
    arch = ARCH[model_type]
    tokens, token_types, merges, scores = _vocab(tokenizer)
    vocab = vocab or len(tokens)
    tokens += [f"<extra_{i}>" for i in range(vocab - len(tokens))]
    token_types += [4] * (vocab - len(token_types))
    if scores is not None:
        scores += [-100.0] * (vocab - len(scores))
    cfg = {"hidden": hidden, "ff": ff, "vocab": vocab, "heads": heads, "kv_heads": kv_heads, "layers": layers,
               "experts": experts, "tied": tied or model_type.startswith("gemma")}  # fmt: skip
    if head_dim:
        cfg["head_dim"] = head_dim
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim or hidden // heads)
    if head_dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if model_type in ("mixtral", "qwen3_moe", "qwen2_moe"):
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
        if model_type != "mixtral":
            w.add_expert_feed_forward_length(ff)
    if model_type in ("gemma2", "gemma3_text"):
        w.add_sliding_window(128)
    w.add_tokenizer_model(tokenizer)
    if tokenizer == "gpt2":
        w.add_tokenizer_pre("smollm")
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
    else:
        w.add_token_scores(scores)
        w.add_add_bos_token(True)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    if tokenizer == "llama":
        w.add_unk_token_id(0)
    if chat_template:
        w.add_chat_template(chat_template)
    for key, value in (extra or {}).items():
        w.add_key_value(key, value[0], value[1])
    for name, shape in shapes(model_type, cfg).items():
        t = T.F32 if len(shape) == 1 else _type_for(name, qtype, types)
        data = tensor_data(rng, shape, t)
        if name.endswith("norm.weight") and model_type.startswith("gemma"):
            data = data + 1  # GGUF stores Gemma's norms as 1 + w
        raw = None if t in (T.F32, T.F16) else t
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _type_for(name: str, qtype: T, types: dict[str, T] | None) -> T:
    for suffix, t in (types or {}).items():
        if name.endswith(suffix):
            return t
    return qtype


def _vocab(kind: str):
    if kind == "gpt2":
        from mlxmerge.io.gguf_tokenizer import _bytes_to_unicode

        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        base = list(_bytes_to_unicode().values())
        merged = ["".join(m.split(" ")) for m in GPT2_MERGES]
        tokens = special + base + merged
        return tokens, [3] * 3 + [1] * (len(tokens) - 3), list(GPT2_MERGES), None
    special = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = special + byte_tokens + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(SPM_PIECES))]
    return tokens, types, None, scores
