"""Abliteration speed and memory: direction finding (prompts/s) and the weight edit as a ratio
to the I/O floor (reading and writing the same model once, unchanged), on the locally trained
toy refuser and on a larger synthetic model. Ratios are against baselines measured in this run.

    python benchmarks/bench_abliterate.py [--hidden 512 --layers 8] [--prompts 128]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlxmerge  # noqa: F401  (BLAS before mlx.core)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def copy_model(path: Path, out: Path) -> float:
    """The I/O floor: read every tensor and write it unchanged (bfloat16), same writer."""
    from mlxmerge.io import ModelCard, open_checkpoint, write_model

    ck = open_checkpoint(path)
    t = time.perf_counter()
    write_model(out, [(n, ck.shape(n)) for n in ck.names()], ck.get, config=ck.config,
                tokenizer_source=ck.path, card=ModelCard("copy"), force=True)  # fmt: skip
    return time.perf_counter() - t


def edit_model(path: Path, out: Path, r: np.ndarray) -> float:
    from mlxmerge.abliterate.pipeline import orthogonalize_model

    t = time.perf_counter()
    orthogonalize_model(path, out, r, force=True)
    return time.perf_counter() - t


def direction_speed(path: Path, n_prompts: int, batch_size: int) -> float:
    """Prompts per second through residual capture (harmful + harmless training prompts)."""
    from mlx_lm import load

    from mlxmerge.abliterate.architectures import architecture
    from mlxmerge.abliterate.directions import mean_residuals
    from mlxmerge.abliterate.hooks import Instrumented
    from mlxmerge.abliterate.prompts import bundled_prompts
    from mlxmerge.lm.chat import chat_tokens, post_instruction_tokens

    model, tok = load(str(path))
    inst = Instrumented(model, architecture("llama"))
    n_pos = len(post_instruction_tokens(tok))
    prompts = (bundled_prompts("harmful", "train") + bundled_prompts("harmless", "train"))[
        :n_prompts
    ]
    lists = chat_tokens(tok, prompts)
    with inst.installed():
        mean_residuals(inst, lists[:batch_size], n_pos, batch_size=batch_size)  # warm-up
        t = time.perf_counter()
        mean_residuals(inst, lists, n_pos, batch_size=batch_size)
    return len(lists) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from mlxmerge.demo.tiny import build_model
    from mlxmerge.demo.toy_refuser import train_refusing_model
    from mlxmerge.io import open_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        toy = train_refusing_model(tmp / "toy", seed=0)
        print(f"toy refuser trained in {time.perf_counter() - t:.1f} s")
        big = build_model(tmp / "big", toy, seed=1, hidden_size=args.hidden, num_layers=args.layers,
                          intermediate_size=3 * args.hidden, num_heads=8, num_kv_heads=4,
                          vocab_size=open_checkpoint(toy).config["vocab_size"])  # fmt: skip
        print(f"{'model':<26}{'size MB':>9}{'prompts/s':>11}{'copy s':>9}{'edit s':>9}"
              f"{'edit/copy':>11}{'MLX peak MB':>13}{'largest MB':>12}")  # fmt: skip
        for name, path in (
            ("toy refuser (64×4)", toy),
            (f"synthetic ({args.hidden}×{args.layers})", big),
        ):
            ck = open_checkpoint(path)
            size = ck.size_on_disk / 1e6
            d = int(ck.config["hidden_size"])
            r = np.random.default_rng(0).normal(size=d).astype(np.float32)
            pps = direction_speed(path, args.prompts, args.batch_size)
            mx.reset_peak_memory()
            copies = [copy_model(path, tmp / "copy") for _ in range(args.repeat)]
            edits = [edit_model(path, tmp / "edit", r) for _ in range(args.repeat)]
            c, e = min(copies), min(edits)
            peak = mx.get_peak_memory() / 1e6  # MLX allocations during copies and edits
            largest = max(ck.numel(n) for n in ck.names()) * 4 / 1e6  # in float32
            print(f"{name:<26}{size:>9.1f}{pps:>11.1f}{c:>9.3f}{e:>9.3f}{e / c:>11.2f}"
                  f"{peak:>13.1f}{largest:>12.1f}")  # fmt: skip
        print(f"process peak RSS {peak_rss_mb():.0f} MB (includes mlx-lm and the loaded models)")


if __name__ == "__main__":
    main()
