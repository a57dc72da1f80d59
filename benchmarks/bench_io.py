"""Time ``mlxmerge convert`` against a plain file copy, and measure its peak memory.

Builds a synthetic Llama-like bf16 checkpoint (hidden 2048, intermediate 5632, vocab 32000,
untied embeddings, ~500 MB shards) of each requested size, then in the same run:

- copies every shard with ``shutil.copyfile`` (the baseline),
- converts it to bf16 and to fp16 with ``mlxmerge.convert.convert``, each in a fresh
  subprocess that reports its own peak RSS (``ru_maxrss``) and its RSS right after import.

Each measurement runs ``--repeat`` times, interleaved, and the fastest is kept (the peak RSS
is the largest seen). Everything is read from the page cache (the files were just written),
for the copy and the conversions alike. Targets: convert ≤ 1.5× the copy time; peak RSS
≤ 3× the largest tensor in fp32 + 300 MB, flat across sizes.

    python benchmarks/bench_io.py --sizes 1,2        # GB
    python benchmarks/bench_io.py --sizes 1,2,4 --dir /path/on/the/disk/to/test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HIDDEN, INTERMEDIATE, VOCAB, KV_DIM = 2048, 5632, 32000, 256
SHARD_BYTES = 500 * 1000**2
BF16 = 2

CHILD = r"""
import json, resource, sys, time
import mlxmerge
from mlxmerge.convert import convert
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t, c = time.perf_counter(), cpu()
convert(sys.argv[1], sys.argv[2], dtype=sys.argv[3], shard_size="5GB")
seconds, cpu_seconds = time.perf_counter() - t, cpu() - c
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "cpu": cpu_seconds, "peak_kb": peak, "import_kb": base}))
"""


def layer_tensors(i: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}"
    return [
        (f"{p}.input_layernorm.weight", (HIDDEN,)),
        (f"{p}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        (f"{p}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
        (f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
        (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
        (f"{p}.self_attn.k_proj.weight", (KV_DIM, HIDDEN)),
        (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        (f"{p}.self_attn.v_proj.weight", (KV_DIM, HIDDEN)),
    ]


def plan_for(size_bytes: int) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    fixed = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("lm_head.weight", (VOCAB, HIDDEN)),
             ("model.norm.weight", (HIDDEN,))]  # fmt: skip
    per_layer = sum(math.prod(s) for _, s in layer_tensors(0)) * BF16
    fixed_bytes = sum(math.prod(s) for _, s in fixed) * BF16
    n_layers = max(1, round((size_bytes - fixed_bytes) / per_layer))
    tensors = fixed[:1] + [t for i in range(n_layers) for t in layer_tensors(i)] + fixed[1:]
    return tensors, n_layers


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], fill: int) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = math.prod(shape) * BF16
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    chunk = np.full(8 * 1024 * 1024, fill, dtype=np.uint16).tobytes()  # 16 MB, non-zero
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        left = offset
        while left:
            k = min(left, len(chunk))
            f.write(chunk[:k])
            left -= k


def build_checkpoint(folder: Path, size_bytes: int) -> dict:
    from mlxmerge.demo.tiny import build_tokenizer, tiny_config

    tensors, n_layers = plan_for(size_bytes)
    shards, used = [[]], 0
    for name, shape in tensors:
        n = math.prod(shape) * BF16
        if shards[-1] and used + n > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += n
    folder.mkdir(parents=True)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, (fname, shard) in enumerate(zip(files, shards)):
        write_shard(folder / fname, shard, fill=0x3C00 + i)  # bf16 ≈ 0.0078, differs per shard
    weight_map = {n: f for f, shard in zip(files, shards) for n, _ in shard}
    total = sum(math.prod(s) for _, s in tensors) * BF16
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = tiny_config(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=n_layers,
                         intermediate_size=INTERMEDIATE, num_heads=32, num_kv_heads=4, tie=False)  # fmt: skip
    config["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    build_tokenizer(folder)
    largest = max(math.prod(s) for _, s in tensors) * 4
    return {"bytes": total, "shards": len(files), "layers": n_layers, "largest_fp32": largest}


def fsync_all(folder: Path) -> None:
    # Our files only: os.sync() would also wait for whatever else the machine is writing.
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def copy_baseline(src: Path, dst: Path) -> dict:
    dst.mkdir()
    t, c = time.perf_counter(), cpu_seconds()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
    fsync_all(dst)
    result = {"seconds": time.perf_counter() - t, "cpu": cpu_seconds() - c}
    shutil.rmtree(dst)
    return result


def convert_child(src: Path, dst: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), dtype],
                         check=True, capture_output=True, text=True)  # fmt: skip
    # The copy's time includes getting its bytes to disk; so does this.
    t = time.perf_counter()
    fsync_all(dst)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["seconds"] += time.perf_counter() - t
    shutil.rmtree(dst)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,2", help="checkpoint sizes in GB, comma separated")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each measurement (min is kept)")
    ap.add_argument("--dir", default=None, help="where to build (default: a temp dir in /tmp)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mlxmerge-bench-io-", dir=args.dir))
    rows = []
    try:
        for gb in [float(s) for s in args.sizes.split(",")]:
            src = root / f"src-{gb:g}GB"
            info = build_checkpoint(src, int(gb * 1000**3))
            fsync_all(src)  # start every size with no write-back pending
            # Interleave the runs and keep each one's fastest: the machine may be shared.
            copies, runs = [], {"bfloat16": [], "float16": []}
            for _ in range(args.repeat):
                copies.append(copy_baseline(src, root / "copy"))
                for d, results in runs.items():
                    results.append(convert_child(src, root / f"out-{d}", d))
            copy = min(copies, key=lambda r: r["seconds"])
            copy_cpu = min(r["cpu"] for r in copies)
            for dtype, results in runs.items():
                r = min(results, key=lambda r: r["seconds"])
                limit = 3 * info["largest_fp32"] + 300 * 1000**2
                rows.append({
                    "size_GB": info["bytes"] / 1e9, "shards": info["shards"], "dtype": dtype,
                    "copy_s": copy["seconds"], "convert_s": r["seconds"],
                    "ratio": r["seconds"] / copy["seconds"],
                    "copy_cpu_s": copy_cpu, "convert_cpu_s": min(x["cpu"] for x in results),
                    "peak_rss_MB": max(x["peak_kb"] for x in results) * 1024 / 1e6,
                    "import_rss_MB": r["import_kb"] * 1024 / 1e6,
                    "largest_fp32_MB": info["largest_fp32"] / 1e6, "rss_limit_MB": limit / 1e6,
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(
        "| checkpoint | shards | to | copy s | convert s | ratio | copy CPU s | convert CPU s "
        "| peak RSS MB | after import MB | largest fp32 MB | RSS limit MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size_GB']:.2f} GB bf16 | {r['shards']} | {r['dtype']} | {r['copy_s']:.2f} "
              f"| {r['convert_s']:.2f} | {r['ratio']:.2f}× | {r['copy_cpu_s']:.2f} "
              f"| {r['convert_cpu_s']:.2f} | {r['peak_rss_MB']:.0f} | {r['import_rss_MB']:.0f} "
              f"| {r['largest_fp32_MB']:.0f} | {r['rss_limit_MB']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
