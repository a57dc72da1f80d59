"""Mixture of experts (``mlxmerge moe``) against each expert alone and a linear merge.

    python benchmarks/quality/moe.py --dir /tmp/mlxmerge-quality     # reuses run.py's models

The experts are run.py's: a base pretrained on copy, an arithmetic and a reversal fine-tune of it
(tiny Llama, hidden 64, 2 layers, intermediate 192). Each MoE takes attention and embeddings from
the base and one expert MLP per fine-tune; the base itself is the third expert ("copy") in the
three-expert rows. Routers come from 16 training prompts per task (``gate_mode: hidden`` unless
named). Scores are exact match on 200 held-out prompts per task.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import examples, scores, table
from run import Bench

import mlxmerge  # noqa: F401

TASKS = ("arithmetic", "reversal", "copy")


def prompts(task: str, n: int = 16) -> list[str]:
    return [p for p, _ in examples(task, n, seed=7)]  # a training seed (< 1000)


def build_moe(b: Bench, name: str, experts: list[tuple[Path, str]], **kw) -> Path:
    from mlxmerge.merge.moe import moe

    cfg = {
        "base_model": str(b.base()),
        "dtype": "float32",
        "experts": [{"source_model": str(p), "positive_prompts": prompts(t)} for p, t in experts],
        **kw,
    }
    return moe(cfg, b.root / "moe" / name, force=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("/tmp/mlxmerge-quality"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("mlxmerge").setLevel(logging.ERROR)
    b = Bench(args.dir, 1.0, False)
    base = b.base()
    arith, rev = b.experts()
    two = [(arith, "arithmetic"), (rev, "reversal")]
    three = [*two, (base, "copy")]
    t0 = time.perf_counter()
    built = {
        "MoE 2 experts, top-1": build_moe(b, "moe2-k1", two, experts_per_token=1),
        "MoE 2 experts, top-2": build_moe(b, "moe2-k2", two, experts_per_token=2),
        "MoE 2 experts, top-1, cheap_embed": build_moe(
            b, "moe2-k1-cheap", two, experts_per_token=1, gate_mode="cheap_embed"
        ),
        "MoE 2 experts, top-1, random": build_moe(
            b, "moe2-k1-random", two, experts_per_token=1, gate_mode="random"
        ),
        "MoE 3 experts (+base), top-1": build_moe(b, "moe3-k1", three, experts_per_token=1),
        "MoE 3 experts (+base), top-2": build_moe(b, "moe3-k2", three, experts_per_token=2),
    }
    moe_seconds = time.perf_counter() - t0
    linear = {
        "linear merge of the 2 experts": b.merged(
            "moe-linear2", {"merge_method": "linear", "dtype": "float32",
                            "models": [{"model": str(m), "parameters": {"weight": 1.0}}
                                       for m, _ in two]},
        ),  # fmt: skip
        "linear merge of the 3": b.merged(
            "moe-linear3", {"merge_method": "linear", "dtype": "float32",
                            "models": [{"model": str(m), "parameters": {"weight": 1.0}}
                                       for m, _ in three]},
        ),  # fmt: skip
    }
    models = {"base (copy)": base, "arithmetic expert": arith, "reversal expert": rev,
              **linear, **built}  # fmt: skip
    s = scores(list(models.values()), [b.test[t] for t in TASKS])
    rows = [[label] + [s[path.name, f"{t}-test"] for t in TASKS] for label, path in models.items()]
    md = table(["model", *TASKS], rows)
    print(f"\n{md}\n\nbuilding the 6 MoEs took {moe_seconds:.1f}s", flush=True)
    (args.dir / "moe-results.md").write_text(md + "\n")
    (args.dir / "moe-results.json").write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
