"""Build the tiny Mixtral family of the MoE statistics test (run once; the outputs are committed).

    PYTHONPATH=. python3 tests/merge/recipes/build_moe_models.py

``mixtral_base`` and two fine-tune-like perturbations ``mixtral_a`` / ``mixtral_b``: 2 layers,
4 experts, hidden 16, float32, in the per-expert Hugging Face layout the Hub's Mixtral
checkpoints use (``block_sparse_moe.experts.{e}.w1|w2|w3``). Each expert's offset has its own
scale (0.5× to 4×), so a top-k over all experts at once keeps a different set of entries than a
top-k per expert: the difference the test is about. The tokenizer is ``models/base``'s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).parent / "models"
VOCAB, H, I, E, L = 272, 16, 32, 4, 2
EXPERT_SCALE = (0.5, 1.0, 2.0, 4.0)
CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": VOCAB,
    "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 8, "num_local_experts": E, "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
    "tie_word_embeddings": False, "sliding_window": None, "bos_token_id": 1, "eos_token_id": 3,
    "torch_dtype": "float32",
}  # fmt: skip


def base_weights(rng) -> dict[str, np.ndarray]:
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (VOCAB, H))}
    for i in range(L):
        p = f"model.layers.{i}."
        for name, shape in {"q_proj": (16, H), "k_proj": (8, H), "v_proj": (8, H),
                            "o_proj": (H, 16)}.items():  # fmt: skip
            w[f"{p}self_attn.{name}.weight"] = rng.normal(0, 0.2, shape)
        w[f"{p}block_sparse_moe.gate.weight"] = rng.normal(0, 0.2, (E, H))
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            w[q + "w1.weight"] = rng.normal(0, 0.2, (I, H))
            w[q + "w2.weight"] = rng.normal(0, 0.2, (H, I))
            w[q + "w3.weight"] = rng.normal(0, 0.2, (I, H))
        w[f"{p}input_layernorm.weight"] = 1 + rng.normal(0, 0.05, H)
        w[f"{p}post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.05, H)
    w["model.norm.weight"] = 1 + rng.normal(0, 0.05, H)
    w["lm_head.weight"] = rng.normal(0, 0.5, (VOCAB, H))
    return w


def tuned(w: dict, rng) -> dict:
    out = {}
    for k, v in w.items():
        scale = 0.05 * np.abs(v).mean()
        if ".experts." in k:
            scale *= EXPERT_SCALE[int(k.split(".experts.")[1].split(".")[0])]
        out[k] = v + scale * rng.normal(size=v.shape)
    return out


def save(name: str, w: dict) -> None:
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    arrays = {k: mx.array(v.astype(np.float32)) for k, v in sorted(w.items())}
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    for f in (ROOT / "base").iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copyfile(f, out / f.name)


def main() -> None:
    base = base_weights(np.random.default_rng(100))
    save("mixtral_base", base)
    save("mixtral_a", tuned(base, np.random.default_rng(101)))
    save("mixtral_b", tuned(base, np.random.default_rng(102)))


if __name__ == "__main__":
    main()
