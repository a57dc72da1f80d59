"""Merge speed and peak memory against the I/O floor, on synthetic Llama-like checkpoints.

For each size (total bytes per model, bf16) and method, a fresh process runs the merge and
reports its peak RSS; the floor is reading every input byte once plus writing the output once
with plain file I/O, measured in the same run on the same files (page cache warm for both,
``os.sync()`` before each timing so no earlier run's write-back is still under way; both
timings include ``fsync`` of what was written). ``--repeat N`` interleaves N runs of each and
keeps the fastest.

    python benchmarks/bench_merge.py --sizes 1,3 --methods linear,slerp,ties,dare_ties,passthrough
    python benchmarks/bench_merge.py --sizes 0.5 --methods linear,slerp,ties \
        --mergekit /path/to/venv-with-mergekit --check-cost

``--mergekit VENV`` merges the same pair with mergekit (its own Python, torch on the CPU) in the
same run and prints time and peak-RSS ratios; ``--check-cost`` runs each merge a second time
with the NaN/Inf checks stubbed out and prints what they cost. Peak RSS is VmHWM on Linux
(``ru_maxrss`` there includes the forking parent's size).
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
    if (folder / "config.json").exists():  # kept from an earlier run with the same --dir
        return folder
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
    os.sync()  # start with no dirty pages of an earlier run still being written back
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


PEAK = r"""
def _peak():
    import resource, sys
    try:  # VmHWM: Linux carries ru_maxrss over exec from the (forking) parent
        return int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) * 1024
    except OSError:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024
"""

CHILD = (
    PEAK
    + r"""
import json, os, sys, time
import mlxmerge
import mlx.core as mx
from mlxmerge.merge.runner import merge
recipe, out, checks = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
if not checks:  # the NaN/Inf checks replaced by nothing: what they cost
    import mlxmerge.io.finite as F
    F.all_finite = lambda x: True
    F.words_finite = lambda words, mask: True
    F.FiniteGuard.check_bytes = lambda *a, **k: None
from mlxmerge.merge.runner import plan_merge, plan_summary
plan = plan_merge(recipe)
estimate = plan_summary(plan, mx.bfloat16)["estimated_peak_bytes"]
t = time.perf_counter()
merge(plan, out, force=True)
for f in os.listdir(out):
    if f.endswith(".safetensors"):
        fd = os.open(os.path.join(out, f), os.O_RDONLY); os.fsync(fd); os.close(fd)
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": _peak(),
                  "cpu": ru.ru_utime + ru.ru_stime, "estimate": estimate}))
"""
)

# mergekit 0.1.5 in its own venv (torch): the same recipe, CPU, its default options.
MERGEKIT_CHILD = (
    PEAK
    + r"""
import json, os, sys, time
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
config = MergeConfiguration.model_validate(json.loads(sys.argv[1]))
t = time.perf_counter()
run_merge(config, sys.argv[2], options=MergeOptions(copy_tokenizer=False, quiet=True))
for f in os.listdir(sys.argv[2]):
    if f.endswith(".safetensors"):
        fd = os.open(os.path.join(sys.argv[2], f), os.O_RDONLY); os.fsync(fd); os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": _peak()}))
"""
)


def check_seconds(folders: list[Path]) -> float:
    """Time of the NaN/Inf bit test alone over every tensor of ``folders`` (loaded first)."""
    from mlxmerge.io import finite, open_checkpoint

    total = 0.0
    for folder in folders:
        ck = open_checkpoint(folder)
        for name in ck.names():
            x = ck.get(name)
            mx.eval(x)
            t = time.perf_counter()
            finite.all_finite(x)
            total += time.perf_counter() - t
            del x
    return total


def run_child(cmd: list[str]) -> dict:
    os.sync()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{cmd[0]} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


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
    if method in ("ties", "dare_ties", "dare_linear", "task_arithmetic"):
        return {"merge_method": method, "base_model": str(base),
                "models": [m(a, weight=1.0, density=0.5), m(b, weight=1.0, density=0.5)]}  # fmt: skip
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        return {"merge_method": method, "base_model": str(base),
                "models": [m(a, weight=1.0, density=0.5, gamma=0.01),
                           m(b, weight=1.0, density=0.5, gamma=0.01)]}  # fmt: skip
    if method in ("della", "della_linear"):
        return {"merge_method": method, "base_model": str(base),
                "models": [m(a, weight=1.0, density=0.5, epsilon=0.1),
                           m(b, weight=1.0, density=0.5, epsilon=0.1)]}  # fmt: skip
    if method == "sce":
        return {"merge_method": "sce", "base_model": str(base), "models": [m(a), m(b)],
                "parameters": {"select_topk": 0.5}}  # fmt: skip
    if method == "ties_rescale":  # TIES with mergekit's L1 rescale of the kept entries
        return {"merge_method": "ties", "base_model": str(base), "parameters": {"rescale": True},
                "models": [m(a, weight=1.0, density=0.5), m(b, weight=1.0, density=0.5)]}  # fmt: skip
    if method == "passthrough":
        half = layers // 2
        return {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, half]}]},
            {"sources": [{"model": str(b), "layer_range": [half, layers]}]}]}  # fmt: skip
    if method in ("model_stock", "ram", "ramplus_tl"):
        return {"merge_method": method, "base_model": str(base), "models": [m(a), m(b)]}
    if method == "karcher":
        return {"merge_method": method, "models": [m(a), m(b)]}
    if method in ("multislerp", "nuslerp"):
        return {"merge_method": method, "models": [m(a, weight=1.0), m(b, weight=0.6)]}
    if method in ("nearswap", "arcee_fusion"):
        return {"merge_method": method, "base_model": str(a), "models": [m(a), m(b)],
                **({"parameters": {"t": 0.01}} if method == "nearswap" else {})}  # fmt: skip
    if method == "passthrough_scale":  # computed, not copied: scale != 1
        return {"merge_method": "passthrough", "models": [m(b, scale=0.5)]}
    raise ValueError(method)


THREE_INPUTS = (  # base + 2 models
    "ties", "dare_ties", "dare_linear", "task_arithmetic", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "sce", "ties_rescale", "model_stock", "ram", "ramplus_tl",
)  # fmt: skip
ONE_INPUT = ("passthrough", "passthrough_scale")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1,3", help="GB per model, comma separated")
    ap.add_argument("--methods", default="linear,slerp,ties,dare_ties,passthrough")
    ap.add_argument(
        "--dir",
        default=None,
        help="scratch folder, kept with its models for the next run (default: a temp dir)",
    )
    ap.add_argument("--mergekit", default=None, metavar="VENV",
                    help="a virtualenv with mergekit: merge the same pair with it and print ratios")  # fmt: skip
    ap.add_argument("--mergekit-repeat", type=int, default=1,
                    help="runs of mergekit for each method (it is slow); the fastest is kept")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each (interleaved); the fastest time and the highest peak are kept")  # fmt: skip
    ap.add_argument("--check-cost", action="store_true",
                    help="also run each merge without the NaN/Inf checks and print their cost")  # fmt: skip
    args = ap.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench_merge-"))
    tok = build_tokenizer(scratch / "tok")
    rows = []
    seen_floors: dict[tuple, list[float]] = {}
    try:
        for gb in (float(s) for s in args.sizes.split(",")):
            models = [synthetic_model(scratch / f"{gb}-{k}", gb, seed, tok)
                      for seed, k in enumerate(("base", "a", "b"))]  # fmt: skip
            base, a, b = models
            layers = json.loads((a / "config.json").read_text())["num_hidden_layers"]
            model_bytes = sum(f.stat().st_size for f in a.glob("*.safetensors"))
            largest = max(VOCAB, INTER) * HIDDEN * 4
            for method in args.methods.split(","):
                recipe = {**recipe_for(method, base, a, b, layers), "dtype": "bfloat16"}
                n_in = 3 if method in THREE_INPUTS else (1 if method in ONE_INPUT else 2)
                ins = [base, a, b][3 - n_in :] if method != "passthrough" else [a]
                out = scratch / "out"
                floors, runs = [], []
                for _ in range(args.repeat):  # interleaved; the fastest of each is kept
                    floors.append(io_floor(ins, model_bytes, scratch / "floor.bin"))
                    runs.append(run_child([sys.executable, "-c", CHILD, json.dumps(recipe), str(out), "1"]))  # fmt: skip
                    shutil.rmtree(out, ignore_errors=True)
                # the floor depends on the files only: the fastest of every measurement of
                # the same inputs in this run (writeback makes a single one vary ±30%)
                seen_floors.setdefault(tuple(ins), []).extend(floors)
                floor = min(seen_floors[tuple(ins)])
                r = min(runs, key=lambda x: x["seconds"])
                r["peak_rss"] = max(x["peak_rss"] for x in runs)
                row = {"gb": gb, "method": method, "s": r["seconds"], "floor": floor, "ins": tuple(ins),
                       "rss": r["peak_rss"], "largest": largest, "est": r["estimate"]}  # fmt: skip
                if args.check_cost:
                    r0 = run_child([sys.executable, "-c", CHILD, json.dumps(recipe), str(out), "0"])
                    shutil.rmtree(out, ignore_errors=True)
                    row["s_nocheck"], row["cpu"], row["cpu_nocheck"] = (
                        r0["seconds"],
                        r["cpu"],
                        r0["cpu"],
                    )
                    # inputs, plus the output (one more model's worth of tensors)
                    row["check_s"] = check_seconds(ins + [a])
                if args.mergekit:
                    py = str(Path(args.mergekit) / "bin" / "python")
                    mks = []
                    for _ in range(args.mergekit_repeat):
                        mks.append(run_child([py, "-c", MERGEKIT_CHILD, json.dumps(recipe), str(out)]))  # fmt: skip
                        shutil.rmtree(out, ignore_errors=True)
                    mk = min(mks, key=lambda x: x["seconds"])
                    mk["peak_rss"] = max(x["peak_rss"] for x in mks)
                    row["mk_s"], row["mk_rss"] = mk["seconds"], mk["peak_rss"]
                rows.append(row)
                print(
                    f"{gb:>4.1f} GB {method:<12} {row['s']:7.2f}s  floor {floor:6.2f}s  "
                    f"ratio {row['s'] / floor:5.2f}x  peak RSS {row['rss'] / 1e6:7.0f} MB  "
                    f"(estimate {r['estimate'] / r['peak_rss']:.2f}x; "
                    f"largest fp32 tensor {largest / 1e6:.0f} MB; target ≤ "
                    f"{(4 * largest + 300e6) / 1e6:.0f} MB)"
                    + (f"  checks {row['check_s']:.2f}s = {100 * row['check_s'] / row['s']:.1f}% "
                       f"(A/B wall {100 * (row['s'] / row['s_nocheck'] - 1):+.0f}%, "
                       f"cpu {100 * (row['cpu'] / row['cpu_nocheck'] - 1):+.0f}%)"
                       if "s_nocheck" in row else "")
                    + (f"  mergekit {row['mk_s']:.2f}s {row['mk_rss'] / 1e6:.0f} MB"
                       if "mk_s" in row else ""),
                    flush=True,
                )  # fmt: skip
            if not args.dir:
                for mdl in models:
                    shutil.rmtree(mdl)
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    head = "| size/model | method | time (s) | I/O floor (s) | / floor | peak RSS (MB) | RSS / (4×largest+300MB) | estimate / peak |"
    cols = "|---|---|---|---|---|---|---|---|"
    if args.check_cost:
        head, cols = head + " NaN/Inf checks (s, % of merge) |", cols + "---|"
    if args.mergekit:
        head += " mergekit (s) | mergekit RSS (MB) | time ratio | RSS ratio |"
        cols += "---|---|---|---|"
    print("\n" + head + "\n" + cols)
    for r in rows:
        r["floor"] = min(seen_floors[r["ins"]])  # every measurement of the run, also later ones
        line = (f"| {r['gb']:g} GB | {r['method']} | {r['s']:.1f} | {r['floor']:.1f} | "
                f"{r['s'] / r['floor']:.2f}× | {r['rss'] / 1e6:.0f} | "
                f"{r['rss'] / (4 * r['largest'] + 300e6):.2f} | {r['est'] / r['rss']:.2f} |")  # fmt: skip
        if args.check_cost:
            line += f" {r['check_s']:.2f} s, {100 * r['check_s'] / r['s']:.1f}% |"
        if args.mergekit:
            line += (f" {r['mk_s']:.1f} | {r['mk_rss'] / 1e6:.0f} | {r['s'] / r['mk_s']:.2f} | "
                     f"{r['rss'] / r['mk_rss']:.2f} |")  # fmt: skip
        print(line)


if __name__ == "__main__":
    main()
