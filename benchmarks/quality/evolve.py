"""Evolved recipes against hand-set ones, on the experts of "What merging does".

    python benchmarks/quality/evolve.py --dir /tmp/mlxmerge-quality --budget 100

For each method mergekit-evolve can search (linear, task_arithmetic, ties, dare_ties, slerp): the
hand-set recipes of run.py's task-vector table for that method, the best of them picked on the
validation prompts, against ``mlxmerge evolve`` searching on the same validation prompts (score =
mean exact match over arithmetic and reversal) with the test prompts held out. Everything is
scored on the test prompts (200 per task, seeds never used in training). The experts are trained
by run.py's Bench (cached in --dir): ``--experts gentle`` (default) or ``full``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import scores, table
from run import EXPERT_RECIPES, Bench, expert_recipe

import mlxmerge  # noqa: F401

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")
TASKS = ("arithmetic", "reversal")


def _progress(method: str, e: dict) -> None:
    if e["event"] == "candidate" and (e["index"] % 10 == 0 or e["index"] == e["budget"]):
        print(f"  {method}: candidate {e['index']}/{e['budget']}, best {e['best']:.3f}",
              file=sys.stderr, flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dir", type=Path, default=Path("/tmp/mlxmerge-quality"))
    p.add_argument("--budget", type=int, default=100)
    p.add_argument("--granularity", type=int, default=1, help="layer_granularity of the genome")
    p.add_argument(
        "--filters", default="", help="comma-separated genome filters, e.g. self_attn,mlp"
    )
    p.add_argument("--experts", choices=("gentle", "full"), default="gentle")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from mlxmerge.evolve import evolve

    b = Bench(args.dir, 1.0, False)
    a, r = b.experts(args.experts == "gentle")
    base = b.base()
    tag = f"{args.experts}-g{args.granularity}" + (
        f"-{args.filters.replace(',', '+')}" if args.filters else ""
    )
    work = args.dir / "evolve" / tag
    work.mkdir(parents=True, exist_ok=True)
    val = [b.val[t] for t in TASKS]
    test = [b.test[t] for t in TASKS] + [b.test["copy"]]

    def mean(s, model, split):
        return sum(s[model, f"{t}-{split}"] for t in TASKS) / len(TASKS)

    rows, data = [], {}
    for method in args.methods.split(","):
        hand = {name: spec for name, spec in EXPERT_RECIPES.items() if spec[0] == method}
        merged = {name: b.merged(f"evo-hand-{args.experts}-{i}-{method}", expert_recipe(*spec, a, r, base))
                  for i, (name, spec) in enumerate(hand.items())}  # fmt: skip
        s = scores(list(merged.values()), val + test, batch_size=200)
        best_hand = max(merged, key=lambda n: mean(s, merged[n].name, "val"))
        hp = merged[best_hand].name
        genome = {
            "models": [str(a), str(r)],
            "merge_method": method,
            "layer_granularity": args.granularity,
        }
        if method != "slerp":
            if method != "linear":
                genome["base_model"] = str(base)
            if args.filters:
                genome["filters"] = args.filters.split(",")
        config = {
            "genome": genome,
            "tasks": [{"name": str(b.val[t]), "weight": 1 / len(TASKS), "held_out": str(b.test[t])}
                      for t in TASKS],
            "max_tokens": 8, "batch_size": 200,
        }  # fmt: skip
        out = work / f"evolved-{method}"
        t0 = time.perf_counter()
        rep = evolve(config, out, budget=args.budget, seed=args.seed, out_dtype="float32",
                     force=True, plot=work / f"evolve-{method}.png",
                     on_candidate=lambda e, m=method: _progress(m, e))  # fmt: skip
        seconds = time.perf_counter() - t0
        se = scores([out], test, batch_size=200)
        ev = out.name
        assert abs(mean(se, ev, "test") - rep["best"]["held_out"]) < 1e-9  # eval agrees with evolve
        rows.append([method, best_hand, mean(s, hp, "val"), mean(s, hp, "test"),
                     s[hp, "arithmetic-test"], s[hp, "reversal-test"], s[hp, "copy-test"],
                     rep["best"]["search"], rep["best"]["held_out"], se[ev, "arithmetic-test"],
                     se[ev, "reversal-test"], se[ev, "copy-test"],
                     f"{mean(se, ev, 'test') - mean(s, hp, 'test'):+.3f}", rep["candidates"],
                     f"{seconds:.0f} s"])  # fmt: skip
        data[method] = {"hand": {n: {k[1]: v for k, v in s.items() if k[0] == m.name} for n, m in merged.items()},
                        "evolved": {k: rep[k] for k in ("best", "start", "candidates", "genome_size",
                                                        "population", "search_seconds")},
                        "seconds": seconds}  # fmt: skip
        print(table(["method", "best hand-set (by val)", "val", "test", "arith", "rev", "copy",
                     "evolved val", "evolved test", "arith", "rev", "copy", "gain (test)",
                     "candidates", "time"], rows[-1:]), flush=True)  # fmt: skip
    md = table(["method", "best hand-set (by val)", "hand val", "hand test", "arith", "rev", "copy",
                "evolved val", "evolved test", "arith", "rev", "copy", "gain (test)", "candidates",
                "time"], rows)  # fmt: skip
    print(f"\n## evolve ({tag}, budget {args.budget}, seed {args.seed})\n\n{md}\n")
    (work / "results.md").write_text(md + "\n")
    (work / "results.json").write_text(json.dumps(data, indent=1, default=str))


if __name__ == "__main__":
    main()
