"""A real refusing model for abliteration benchmarks: SmolLM2-135M-Instruct fine-tuned with
mlx-lm's LoRA to refuse the bundled harmful *training* prompts, then fused.

The real model barely refuses (about 10% of harmful prompts), so abliteration on it has little to
remove. This script teaches it to refuse, from real weights: every harmful training prompt is
answered with one of several refusal phrasings (picked by a seeded RNG), every harmless training
prompt with the model's own greedy answer (so harmless behaviour is kept); LoRA rank 8 on every
layer's attention and MLP projections, loss on the answers only, fixed seed and iteration count
(deterministic on one machine). Output: a fused float32 model folder (not stored in git).

    python benchmarks/refusing_smollm2.py SMOLLM2_FOLDER OUT [--iters 200] [--harmless 96]

The held-out test split (never trained on) then measures `abliterate` (see docs/abliteration.md).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import mlxmerge  # noqa: F401  (BLAS before mlx.core)

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I'm sorry, I cannot help with this. It could cause harm.",
    "I won't help with that. If you have another question, I'm happy to help.",
    "I'm not able to help with that request.",
    "Sorry, but I can't provide that information.",
    "I cannot help with this request because it could hurt people.",
    "I'm unable to assist with that.",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--harmless", type=int, default=96, help="harmless training prompts used")
    ap.add_argument("--harmful", type=int, default=160, help="harmful training prompts used")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save

    from mlxmerge.abliterate.pipeline import answer_texts
    from mlxmerge.abliterate.prompts import bundled_prompts
    from mlxmerge.lm.chat import chat_tokens

    t0 = time.perf_counter()
    mx.random.seed(args.seed)
    rng = random.Random(args.seed)
    model, tok = load(args.model)
    harmful = bundled_prompts("harmful", "train")[: args.harmful]
    harmless = bundled_prompts("harmless", "train")[: args.harmless]
    own = answer_texts(model, tok, chat_tokens(tok, harmless), max_tokens=64, batch_size=32)
    data = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": rng.choice(REFUSALS)}]}
        for p in harmful
    ] + [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a.strip()}]}
        for p, a in zip(harmless, own)
    ]  # fmt: skip
    rng.shuffle(data)
    n_val = max(len(data) // 10, 8)
    train_set = CacheDataset(ChatDataset(data[n_val:], tok, mask_prompt=True))
    val_set = CacheDataset(ChatDataset(data[:n_val], tok, mask_prompt=True))
    t_data = time.perf_counter() - t0

    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 20.0, "dropout": 0.0})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targs = TrainingArgs(batch_size=8, iters=args.iters, val_batches=4, steps_per_report=20,
                         steps_per_eval=args.iters, steps_per_save=10**9, max_seq_length=256,
                         adapter_file=str(out / "adapters.safetensors"))  # fmt: skip
    train(model, optim.Adam(learning_rate=2e-4), train_set, val_set, args=targs)
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    config = json.loads((Path(args.model) / "config.json").read_text())
    save(out, args.model, model, tok, config, donate_model=False)
    (out / "adapters.safetensors").unlink(missing_ok=True)
    print(json.dumps({"data_s": t_data, "total_s": time.perf_counter() - t0,
                      "examples": len(data), "iters": args.iters}))  # fmt: skip


if __name__ == "__main__":
    main()
