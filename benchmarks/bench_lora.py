"""LoRA extraction: time against the I/O floor, peak RSS from 1 to 3 GB, and KL against rank.

Speed: synthetic Llama-like bf16 checkpoints from ``bench_merge.py`` (hidden 2048, intermediate
5632, vocab 32000); a base and a "fine-tune" (another seed: a full-rank task vector, so the SVD
does its full work). A fresh process runs ``extract_lora`` at rank 16 and reports its peak RSS;
the floor is a plain read of both models (page cache warm), measured in the same run. One
(5632, 2048) matrix is also factored with the exact and the randomized SVD, for their ratio.

Quality: the quality benchmark's trained tiny models (a base pretrained on copying, and an
arithmetic fine-tune of it); for each rank, the mean KL(fine-tune ‖ base + adapter) over the
answer tokens of held-out arithmetic prompts, and the teacher-forced answer-token accuracy.

    python benchmarks/bench_lora.py --sizes 1,3 --kl
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "quality"))

import mlx.core as mx
from bench_merge import io_floor, synthetic_model

import mlxmerge  # noqa: F401  (OpenBLAS before mlx)
from mlxmerge.demo.tiny import build_tokenizer

CHILD = r"""
import json, resource, sys, time
import mlxmerge
from mlxmerge.lora import extract_lora
ft, base, out, rank, svd = sys.argv[1:6]
t = time.perf_counter()
report = extract_lora(ft, base, out, rank=int(rank), svd=svd, force=True)
print(json.dumps({"seconds": time.perf_counter() - t, "modules": len(report["modules"]),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def speed(sizes: list[float], scratch: Path, rank: int) -> list[tuple]:
    tok = build_tokenizer(scratch / "tok")
    rows = []
    for gb in sizes:
        base = synthetic_model(scratch / f"{gb}-base", gb, 0, tok)
        ft = synthetic_model(scratch / f"{gb}-ft", gb, 1, tok)
        out = scratch / "adapter"
        res = subprocess.run([sys.executable, "-c", CHILD, str(ft), str(base), str(out), str(rank), "auto"],
                             capture_output=True, text=True, check=True)  # fmt: skip
        r = json.loads(res.stdout.strip().splitlines()[-1])
        adapter_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        floor = io_floor([base, ft], adapter_bytes, scratch / "floor.bin")
        rows.append((gb, r["modules"], r["seconds"], floor, r["peak_rss"]))
        print(f"{gb:>4.1f} GB: {r['modules']} matrices at rank {rank} in {r['seconds']:.1f}s, floor "
              f"{floor:.1f}s ({r['seconds'] / floor:.2f}x), peak RSS {r['peak_rss'] / 1e6:.0f} MB",
              flush=True)  # fmt: skip
        for p in (base, ft, out):
            shutil.rmtree(p, ignore_errors=True)
    return rows


def svd_ratio(rank: int) -> tuple[float, float]:
    from mlxmerge.lora.svd import low_rank

    x = mx.random.normal((5632, 2048), key=mx.random.key(0))
    mx.eval(x)
    times = []
    for method in ("exact", "randomized"):
        t = time.perf_counter()
        mx.eval(*low_rank(x, rank=rank, method=method)[:2])
        times.append(time.perf_counter() - t)
    return times[0], times[1]


def _trained(scratch: Path):
    from common import make_tokenizer, train

    tok_dir = make_tokenizer(scratch / "qtok")
    base, ft = scratch / "base", scratch / "ft"
    t = time.perf_counter()
    if not (base / "config.json").is_file():  # cached in --dir between runs
        train(base, tok_dir, {"copy": 1.0}, seed=0, steps=600, lr=3e-3)
    if not (ft / "config.json").is_file():
        train(ft, tok_dir, {"arithmetic": 1.0}, init=base, seed=1, steps=250, lr=1e-3)
    print(f"base and arithmetic fine-tune ready in {time.perf_counter() - t:.0f}s", flush=True)
    return base, ft


def _with_fine_tuned_rest(base: Path, ft: Path, out: Path) -> Path:
    """``base`` whose non-linear tensors (embeddings, norms) are the fine-tune's: what a LoRA of
    the linear layers is left to reproduce."""
    from mlxmerge.io import ModelCard, open_checkpoint, write_model
    from mlxmerge.lora.extract import is_linear

    b, f = open_checkpoint(base), open_checkpoint(ft)
    plan = [(n, b.shape(n)) for n in b.names()]
    pick = lambda n: (b if is_linear(n, b.shape(n)) else f).get(n)
    return write_model(out, plan, pick, config=b.config, tokenizer_source=b.path,
                       card=ModelCard("base + fine-tuned embeddings and norms"),
                       dtype=mx.float32, layout="hf", force=True)  # fmt: skip


def kl_against_rank(scratch: Path, ranks: list[int]) -> dict[str, list[tuple]]:
    from common import Encoder, examples
    from mlx_lm import load

    from mlxmerge.lora import extract_lora

    base, ft = _trained(scratch)
    ft_model, tok = load(str(ft))
    tokens, mask = Encoder(tok).batch(examples("arithmetic", 200, 2000))

    def log_probs(model):
        logits = model(tokens[:, :-1]).astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    ref = log_probs(ft_model)
    p_ref = mx.exp(ref)
    target = tokens[:, 1:]

    def row(label, model, rank, kept):
        logp = log_probs(model)
        kl = ((p_ref * (ref - logp)).sum(-1) * mask).sum() / mask.sum()
        acc = (((logp.argmax(-1) == target) * mask).sum() / mask.sum()).item()
        return (label, rank, kept, kl.item(), acc)

    tables = {}
    starts = {
        "base": base,
        "base + fine-tuned embeddings/norms": _with_fine_tuned_rest(
            base, ft, scratch / "base-rest"
        ),
    }
    for start_label, start in starts.items():
        rows = [row(start_label, load(str(start))[0], 0, 0.0)]
        for r in ranks:
            out = scratch / f"adapter-r{r}"
            rep = extract_lora(ft, start, out, rank=r, svd="exact", force=True)
            total = sum(m["delta_norm"] ** 2 for m in rep["modules"])
            kept = sum(m["energy"] * m["delta_norm"] ** 2 for m in rep["modules"]) / total
            rows.append(row(f"rank {r}", load(str(start), adapter_path=str(out))[0], r, kept))
            print(f"{start_label}, rank {r:>3}: kept {kept:.3f} of ‖ΔW‖², KL {rows[-1][3]:.4f}, "
                  f"acc {rows[-1][4]:.3f}", flush=True)  # fmt: skip
        rows.append(row("fine-tune", ft_model, None, 1.0))
        tables[start_label] = rows
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1,3", help="GB per model, comma separated ('' to skip)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--kl", action="store_true", help="also train tiny models and measure KL vs rank"
    )
    ap.add_argument("--ranks", default="1,2,4,8,16,32,64")
    ap.add_argument(
        "--no-svd-ratio", action="store_true", help="skip the exact-vs-randomized timing"
    )
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # extract_lora warns about every uncovered tensor
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench_lora-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        if not args.no_svd_ratio:
            exact, rand = svd_ratio(args.rank)
            print(f"one (5632, 2048) task vector at rank {args.rank}: exact SVD {exact:.2f}s, "
                  f"randomized {rand:.2f}s ({exact / rand:.0f}x)", flush=True)  # fmt: skip
        rows = speed([float(s) for s in args.sizes.split(",") if s], scratch, args.rank)
        if rows:
            print(
                "\n| size/model | matrices | time (s) | read both models (s) | ratio | peak RSS (MB) |"
            )
            print("|---|---|---|---|---|---|")
            for gb, n, sec, floor, rss in rows:
                print(
                    f"| {gb:g} GB | {n} | {sec:.1f} | {floor:.1f} | {sec / floor:.2f}× | {rss / 1e6:.0f} |"
                )
        if args.kl:
            tables = kl_against_rank(scratch, [int(r) for r in args.ranks.split(",")])
            for start, kl in tables.items():
                print(f"\nLoRA of the linear layers on: {start}")
                print("| model | rank | share of ‖ΔW‖² kept | KL(fine-tune ‖ model) | answer acc |")
                print("|---|---|---|---|---|")
                for label, r, kept, klv, acc in kl:
                    rank = "-" if r is None else r
                    print(f"| {label} | {rank} | {kept:.3f} | {klv:.4f} | {acc:.3f} |")
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
