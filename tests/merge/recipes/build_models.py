"""Build the tiny input models the recipe corpus merges (run once; the outputs are committed).

    PYTHONPATH=. python3 tests/merge/recipes/build_models.py

Every model is a 4-layer Llama (hidden 32, float32, so no two task-vector entries tie at a top-k
threshold) that both mergekit and mlxmerge read: ``base`` and its fine-tune-like perturbations
``ft_a``, ``ft_b``, ``ft_c`` (a shared direction plus their own noise, as fine-tunes of one base
are; ``ft_c`` far enough for slerp to curve), ``tied_a`` / ``tied_b`` (``tie_word_embeddings: true`` *and* a redundant
``lm_head`` copy, as some checkpoints ship), and ``tok_plus`` (two added tokens: 274 rows
against the others' 272, and its own chat template). ``lora`` and ``abliterated-lora`` are PEFT LoRA
adapters for ``base`` (the recipes' ``models/base+models/lora`` references), written directly as
PEFT saves them (``adapter_config.json`` + ``adapter_model.safetensors``, no torch needed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmerge.demo.tiny import build_tokenizer, tiny_config

ROOT = Path(__file__).parent / "models"
VOCAB = 272
ADDED = ["<|tool|>", "<|think|>"]
PLUS_TEMPLATE = (
    "{% for m in messages %}<|think|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def base_weights(rng, vocab: int, config: dict) -> dict[str, np.ndarray]:
    h, f = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, h))}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
            "mlp.down_proj": (h, f),
        }  # fmt: skip
        for name, shape in shapes.items():
            w[f"{p}{name}.weight"] = rng.normal(0, 0.2, shape)
        w[f"{p}input_layernorm.weight"] = 1 + rng.normal(0, 0.05, h)
        w[f"{p}post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.05, h)
    w["model.norm.weight"] = 1 + rng.normal(0, 0.05, h)
    w["lm_head.weight"] = rng.normal(0, 0.5, (vocab, h))
    return w


def perturb(w: dict, rng, spread: float, common: dict | None = None) -> dict:
    """base + spread·|v|·(0.7·common + 0.7·own noise): offsets of two fine-tunes have cos ≈ 0.5."""
    out = {}
    for k, v in w.items():
        shared = common[k] if common else rng.normal(size=v.shape)
        out[k] = v + spread * np.abs(v).mean() * 0.7 * (shared + rng.normal(size=v.shape))
    return out


def save(name: str, w: dict, config: dict, tok: Path) -> None:
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    arrays = {k: mx.array(v.astype(np.float32)) for k, v in sorted(w.items())}
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in tok.iterdir():
        shutil.copyfile(f, out / f.name)


def add_tokens(tok: Path, out: Path) -> None:
    """A copy of ``tok`` with ADDED appended as added tokens (ids 272, 273) and another template."""
    from tokenizers import AddedToken, Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    t = Tokenizer.from_file(str(tok / "tokenizer.json"))
    t.add_tokens([AddedToken(a, special=False, normalized=False) for a in ADDED])
    t.save(str(out / "tokenizer.json"))
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["chat_template"] = PLUS_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copyfile(tok / "special_tokens_map.json", out / "special_tokens_map.json")


# name → (rank, lora_alpha, target modules, seed). ``lora`` adapts attention and MLP inputs;
# ``abliterated-lora`` the residual-writing matrices an abliteration changes. Both adapt the
# embedding (PEFT's lora_embedding_A/B, stored transposed against linear layers' lora_A/B).
ADAPTERS = {
    "lora": (4, 8, ("embed_tokens", "q_proj", "v_proj", "up_proj"), 17),
    "abliterated-lora": (2, 3, ("embed_tokens", "o_proj", "down_proj"), 30),
}


def save_peft_adapter(name: str, base: dict, config: dict) -> None:
    """A PEFT LoRA adapter for ``base`` with nonzero A and B: ΔW = (lora_alpha / r) · B A.

    Keys and config fields are those ``peft.PeftModel.save_pretrained`` writes for a Llama; B is
    random (PEFT initializes it to zero) so every adapted tensor really changes.
    """
    r, alpha, targets, seed = ADAPTERS[name]
    rng = np.random.default_rng(seed)
    tensors = {}
    for key in sorted(base):
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        rows, cols = base[key].shape  # (out, in), or (vocab, hidden) for the embedding
        p = f"base_model.model.{module}"
        if module.endswith("embed_tokens"):  # PEFT Embedding: ΔW = scale · (B A)ᵀ
            tensors[f"{p}.lora_embedding_A"] = rng.normal(0, 0.1, (r, rows))
            tensors[f"{p}.lora_embedding_B"] = rng.normal(0, 0.1, (cols, r))
        else:
            tensors[f"{p}.lora_A.weight"] = rng.normal(0, 0.1, (r, cols))
            tensors[f"{p}.lora_B.weight"] = rng.normal(0, 0.1, (rows, r))
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    arrays = {k: mx.array(v.astype(np.float32)) for k, v in tensors.items()}
    mx.save_safetensors(str(out / "adapter_model.safetensors"), arrays, metadata={"format": "pt"})
    cfg = {
        "base_model_name_or_path": "models/base", "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "lora_alpha": alpha,
        "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA", "r": r,
        "target_modules": sorted(targets), "task_type": "CAUSAL_LM", "use_dora": False,
        "use_rslora": False,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def main() -> None:
    scratch = ROOT.parent / "_tok"
    shutil.rmtree(scratch, ignore_errors=True)
    tok = build_tokenizer(scratch / "base", vocab_size=VOCAB)
    assert len(json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"]) == VOCAB
    add_tokens(tok, scratch / "plus")
    config = tiny_config(hidden_size=32, num_layers=4, intermediate_size=32, vocab_size=VOCAB,
                         tie=False)  # fmt: skip
    rng = np.random.default_rng(20260)
    base = base_weights(rng, VOCAB, config)
    save("base", base, config, tok)
    common = {k: rng.normal(size=v.shape) for k, v in base.items()}
    for name, spread in (("ft_a", 0.05), ("ft_b", 0.05), ("ft_c", 0.6)):
        save(name, perturb(base, rng, spread, common), config, tok)
    tied_cfg = dict(config, tie_word_embeddings=True)
    for name in ("tied_a", "tied_b"):
        w = perturb(base, rng, 0.3)
        w["lm_head.weight"] = w["model.embed_tokens.weight"]  # the redundant copy
        save(name, w, tied_cfg, tok)
    plus = perturb(base, rng, 0.05, common)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        plus[k] = np.concatenate([plus[k], rng.normal(0, 0.5, (len(ADDED), 32))])
    save("tok_plus", plus, dict(config, vocab_size=VOCAB + len(ADDED)), scratch / "plus")
    for name in ADAPTERS:  # own seeds: the models above stay as they were
        save_peft_adapter(name, base, config)
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
