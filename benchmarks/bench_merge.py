"""Merge speed and peak memory against the I/O floor, on synthetic Llama-like checkpoints.

For each size (total bytes per model, bf16) and method, a fresh process runs the merge and
reports its peak RSS; the floor is reading every input byte once plus writing the output once
with plain file I/O, measured in the same run on the same files (page cache warm for both).

    python benchmarks/bench_merge.py --sizes 1,3 --methods linear,slerp,ties,dare_ties,passthrough
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import mlx.core as mx

import mlxmerge  # noqa: F401  (OpenBLAS before mlx)
from mlxmerge.demo.tiny import build_tokenizer
from mlxmerge.io import ModelCard, write_model

HIDDEN, INTER, VOCAB = 2048, 5632, 32000


def synthetic_model(folder: Path, gigabytes: float, seed: int, tok: Path) -> Path:
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN) * 2
    fixed = 2 * VOCAB * HIDDEN * 2
    layers = max(1, round((gigabytes * 1e9 - fixed) / per_layer))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "num_hidden_layers": layers, "intermediate_size": INTER, "num_attention_heads": 16,
        "num_key_value_heads": 16, "rms_norm_eps": 1e-5, "vocab_size": VOCAB, "tie_word_embeddings": False,
    }  # fmt: skip
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN),
              "model.norm.weight": (HIDDEN,)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)

    class Lazy(dict):  # tensors generated on demand, so building a checkpoint stays small too
        def __getitem__(self, name):
            shape = shapes[name]
            key = mx.random.key(seed * 100003 + zlib.crc32(name.encode()))
            return (0.02 * mx.random.normal(shape, key=key)).astype(mx.bfloat16)

    weights = Lazy({n: None for n in shapes})

    plan = [(n, shapes[n]) for n in sorted(shapes)]
    return write_model(folder, plan, weights.__getitem__, config=config, tokenizer_source=tok,
                       card=ModelCard("synthetic"), dtype=mx.bfloat16, layout="hf", force=True,
                       shard_size=2 * 10**9)  # fmt: skip


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> float:
    t = time.perf_counter()
    buf = bytearray(64 << 20)
    for folder in inputs:
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    with open(scratch, "wb") as fh:
        left = out_bytes
        while left > 0:
            n = min(left, len(buf))
            fh.write(memoryview(buf)[:n])
            left -= n
        fh.flush()
        os.fsync(fh.fileno())
    scratch.unlink()
    return time.perf_counter() - t


CHILD = r"""
import json, resource, sys, time
import mlxmerge
from mlxmerge.merge.runner import merge
recipe, out = json.loads(sys.argv[1]), sys.argv[2]
t = time.perf_counter()
merge(recipe, out, force=True)
import os
for f in os.listdir(out):
    if f.endswith(".safetensors"):
        fd = os.open(os.path.join(out, f), os.O_RDONLY); os.fsync(fd); os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def recipe_for(method: str, base: Path, a: Path, b: Path, layers: int) -> dict:
    m = lambda p, **kw: {"model": str(p), **({"parameters": kw} if kw else {})}
    if method == "linear":
        return {"merge_method": "linear", "models": [m(a, weight=0.5), m(b, weight=0.5)]}
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": str(a),
            "models": [m(a), m(b)],
            "parameters": {"t": 0.5},
        }
    if method in ("ties", "dare_ties"):
        return {"merge_method": method, "base_model": str(base),
                "models": [m(a, weight=1.0, density=0.5), m(b, weight=1.0, density=0.5)]}  # fmt: skip
    if method == "passthrough":
        half = layers // 2
        return {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, half]}]},
            {"sources": [{"model": str(b), "layer_range": [half, layers]}]}]}  # fmt: skip
    raise ValueError(method)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1,3", help="GB per model, comma separated")
    ap.add_argument("--methods", default="linear,slerp,ties,dare_ties,passthrough")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench_merge-"))
    tok = build_tokenizer(scratch / "tok")
    rows = []
    try:
        for gb in (float(s) for s in args.sizes.split(",")):
            models = [synthetic_model(scratch / f"{gb}-{k}", gb, seed, tok)
                      for seed, k in enumerate(("base", "a", "b"))]  # fmt: skip
            base, a, b = models
            layers = json.loads((a / "config.json").read_text())["num_hidden_layers"]
            model_bytes = sum(f.stat().st_size for f in a.glob("*.safetensors"))
            largest = INTER * HIDDEN * 4
            if VOCAB * HIDDEN > INTER * HIDDEN:
                largest = VOCAB * HIDDEN * 4
            for method in args.methods.split(","):
                recipe = recipe_for(method, base, a, b, layers)
                n_in = (
                    3 if method in ("ties", "dare_ties") else (1 if method == "passthrough" else 2)
                )
                ins = [base, a, b][3 - n_in :] if method != "passthrough" else [a]
                floor = io_floor(ins, model_bytes, scratch / "floor.bin")
                out = scratch / "out"
                res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(recipe), str(out)],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                r = json.loads(res.stdout.strip().splitlines()[-1])
                shutil.rmtree(out, ignore_errors=True)
                rows.append((gb, method, r["seconds"], floor, r["peak_rss"], largest))
                print(f"{gb:>4.1f} GB {method:<12} {r['seconds']:7.2f}s  floor {floor:6.2f}s  "
                      f"ratio {r['seconds'] / floor:5.2f}x  peak RSS {r['peak_rss'] / 1e6:7.0f} MB  "
                      f"(largest fp32 tensor {largest / 1e6:.0f} MB; target ≤ {(4 * largest + 300e6) / 1e6:.0f} MB)",
                      flush=True)  # fmt: skip
            for mdl in models:
                shutil.rmtree(mdl)
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n| size/model | method | time (s) | I/O floor (s) | ratio | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for gb, method, sec, floor, rss, _ in rows:
        print(
            f"| {gb:g} GB | {method} | {sec:.1f} | {floor:.1f} | {sec / floor:.2f}× | {rss / 1e6:.0f} |"
        )
    try:
        import mergekit  # noqa: F401

        print("mergekit is importable but the side-by-side run is not wired in yet")
    except ImportError:
        print("mergekit not importable (optional extra, needs torch): no side-by-side comparison")


if __name__ == "__main__":
    main()
