"""What merging does, measured on small models trained here (no hub, fixed seeds).

    python benchmarks/quality/run.py                       # everything, ~30 min on 2 busy cores
    python benchmarks/quality/run.py --only soups,negation --dir /tmp/q
    python benchmarks/quality/run.py --scale 0.3           # fewer training steps (quick look)

Sections (each prints a markdown table; all are written to DIR/results.md and results.json):

- soups:        5 fine-tunes of one base at learning rates 3e-4 … 3e-2 on arithmetic + reversal;
                best single vs uniform soup vs greedy soup (selected on validation, scored on test)
                vs the output-averaged ensemble.
- soups_seeds:  4 fine-tunes at one learning rate (3e-3, then 1e-3) and different data orders.
- task_vectors: an arithmetic expert and a reversal expert from one base, merged with
                linear, task_arithmetic, TIES, DARE (drop 0.5/0.9/0.99), DARE-TIES, SLERP,
                model_stock; each task's score as % of its expert.
- task_vectors_gentle: the same with gentler experts (lr 5e-4, half the batches replay copy).
- negation:     multitask model − λ·τ_arithmetic: arithmetic should drop, reversal stay.
- frankenmerge: layers of the two experts stacked (passthrough) vs each expert.
- divergent:    soups of fine-tunes of two *different* random bases vs of one base.
- test_time:    `eval --samples 16` on the arithmetic expert: majority / best-of accuracy against
                samples and tokens (also DIR/test_time.png).

Models are cached in DIR; ``--fresh`` retrains them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import held_out, make_tokenizer, scores, table, train, write_generation_task

import mlxmerge  # noqa: F401

log = logging.getLogger("quality")

PRETRAIN = {"copy": 1.0}
MIX = {"arithmetic": 0.5, "reversal": 0.5}
LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
SECTIONS = (
    "soups", "soups_seeds", "task_vectors", "task_vectors_gentle", "negation", "frankenmerge", "divergent", "test_time",
)  # fmt: skip


class Bench:
    def __init__(self, root: Path, scale: float, fresh: bool):
        self.root = root
        self.scale = scale
        self.fresh = fresh
        self.train_seconds: dict[str, float] = {}
        root.mkdir(parents=True, exist_ok=True)
        self.tok = make_tokenizer(root / "tokenizer")
        self.data = root / "data"
        self.data.mkdir(exist_ok=True)
        self.val, self.test = {}, {}
        for t in ("arithmetic", "reversal", "copy"):
            self.val[t], self.test[t] = held_out(self.data, t)
        from common import examples

        mix = lambda seed: [r for t in MIX for r in examples(t, 100, seed)]
        self.val["mix"] = write_generation_task(self.data / "mix-val.jsonl", mix(1000))
        self.test["mix"] = write_generation_task(self.data / "mix-test.jsonl", mix(2000))

    def model(self, name: str, mixture: dict, *, init: str | None = None, seed: int = 0,
              steps: int, lr: float = 3e-3) -> Path:  # fmt: skip
        path = self.root / "models" / name
        if path.is_dir() and not self.fresh and (path / "config.json").is_file():
            return path
        run = train(path, self.tok, mixture, init=self.model_path(init), seed=seed,
                    steps=max(20, int(steps * self.scale)), lr=lr)  # fmt: skip
        self.train_seconds[name] = run.seconds
        return path

    def model_path(self, name: str | None) -> Path | None:
        return None if name is None else self.root / "models" / name

    def merged(self, name: str, recipe: dict) -> Path:
        from mlxmerge.merge.runner import merge

        return merge(recipe, self.root / "merges" / name, out_dtype="float32", force=True)

    # -- the models ---------------------------------------------------------------------------

    def base(self) -> Path:
        return self.model("base", PRETRAIN, seed=0, steps=600, lr=3e-3)

    def experts(self, gentle: bool = False) -> tuple[Path, Path]:
        """Single-task fine-tunes; ``gentle``: lower learning rate, fewer steps, half the batches
        replaying the base's copy task (smaller task vectors, less forgetting)."""
        self.base()
        if gentle:
            arith, rev = {"arithmetic": 0.5, "copy": 0.5}, {"reversal": 0.5, "copy": 0.5}
            kw, tag = {"steps": 200, "lr": 5e-4}, "-gentle"
        else:
            arith, rev = {"arithmetic": 1.0}, {"reversal": 1.0}
            kw, tag = {"steps": 250, "lr": 1e-3}, ""
        a = self.model(f"expert-arithmetic{tag}", arith, init="base", seed=1, **kw)
        b = self.model(f"expert-reversal{tag}", rev, init="base", seed=2, **kw)
        return a, b

    def sweep(self) -> list[Path]:
        self.base()
        return [self.model(f"mix-lr{lr:g}", MIX, init="base", seed=10 + i, steps=150, lr=lr)
                for i, lr in enumerate(LRS)]  # fmt: skip


def soups(b: Bench) -> tuple[str, dict]:
    from mlxmerge.merge.soup import ensemble_score, soup

    models = b.sweep()
    val = scores(models, [b.val["mix"]])
    test = scores(models, [b.test["mix"]])
    t0 = time.perf_counter()
    greedy = soup(models, b.root / "merges" / "greedy-soup", eval_task=b.val["mix"], method="greedy",
                  out_dtype="float32", force=True, max_tokens=8, batch_size=100)  # fmt: skip
    greedy_seconds = time.perf_counter() - t0
    uniform = b.merged("uniform-soup", {"merge_method": "linear", "dtype": "float32",
                       "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]})  # fmt: skip
    soup_test = scores([uniform, Path(greedy["output"])], [b.test["mix"], b.val["mix"]])
    ens_test = ensemble_score([str(m) for m in models], b.test["mix"], max_tokens=8, batch_size=100)
    ens_val = ensemble_score([str(m) for m in models], b.val["mix"], max_tokens=8, batch_size=100)
    best = max(models, key=lambda m: val[m.name, "mix-val"])
    kept = [Path(m).name for m in greedy["ingredients"]]
    rows = [[m.name, val[m.name, "mix-val"], test[m.name, "mix-test"]] for m in models]
    rows += [
        [f"best single by validation ({best.name})", val[best.name, "mix-val"], test[best.name, "mix-test"]],
        ["uniform soup (5)", soup_test["uniform-soup", "mix-val"], soup_test["uniform-soup", "mix-test"]],
        [f"greedy soup ({', '.join(kept)})", soup_test["greedy-soup", "mix-val"], soup_test["greedy-soup", "mix-test"]],
        ["ensemble of 5 (5× inference)", ens_val, ens_test],
    ]  # fmt: skip
    md = table(["model", "exact match, validation", "exact match, test"], rows)
    data = {"rows": rows, "greedy_steps": greedy["steps"], "greedy_built": greedy["built"],
            "greedy_seconds": greedy_seconds}  # fmt: skip
    return md, data


def soups_seeds(b: Bench) -> tuple[str, dict]:
    """Soup ingredients from one learning rate and four data orders (seeds), at lr 3e-3 and 1e-3."""
    mds, data = [], {}
    for lr in (3e-3, 1e-3):
        md, d = _soup_of_seeds(b, lr)
        mds.append(f"learning rate {lr:g}:\n\n{md}")
        data[f"{lr:g}"] = d
    return "\n\n".join(mds), data


def _soup_of_seeds(b: Bench, lr: float) -> tuple[str, dict]:
    from mlxmerge.merge.soup import ensemble_score, soup

    b.sweep()
    models = [b.model_path(f"mix-lr{lr:g}")] + [
        b.model(f"mix-lr{lr:g}-seed{s}", MIX, init="base", seed=s, steps=150, lr=lr) for s in (21, 22, 23)
    ]  # fmt: skip
    tag = f"seeds-lr{lr:g}"
    greedy = soup(models, b.root / "merges" / f"greedy-soup-{tag}", eval_task=b.val["mix"],
                  out_dtype="float32", force=True, max_tokens=8, batch_size=100)  # fmt: skip
    uniform = b.merged(f"uniform-soup-{tag}", {"merge_method": "linear", "dtype": "float32",
                       "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]})  # fmt: skip
    val = scores([*models, uniform, Path(greedy["output"])], [b.val["mix"]])
    test = scores([*models, uniform, Path(greedy["output"])], [b.test["mix"]])
    ens = [ensemble_score([str(m) for m in models], t, max_tokens=8, batch_size=100)
           for t in (b.val["mix"], b.test["mix"])]  # fmt: skip
    best = max(models, key=lambda m: val[m.name, "mix-val"])
    kept = [Path(m).name for m in greedy["ingredients"]]
    rows = [[m.name, val[m.name, "mix-val"], test[m.name, "mix-test"]] for m in models]
    rows += [
        [f"best single by validation ({best.name})", val[best.name, "mix-val"], test[best.name, "mix-test"]],
        ["uniform soup (4)", val[uniform.name, "mix-val"], test[uniform.name, "mix-test"]],
        [f"greedy soup ({', '.join(kept)})", val[f"greedy-soup-{tag}", "mix-val"], test[f"greedy-soup-{tag}", "mix-test"]],
        ["ensemble of 4 (4× inference)", *ens],
    ]  # fmt: skip
    md = table(["model", "exact match, validation", "exact match, test"], rows)
    return md, {"rows": rows, "greedy_steps": greedy["steps"], "greedy_built": greedy["built"]}


EXPERT_RECIPES = {
    "linear (average)": ("linear", {}, {"weight": 0.5}),
    "task_arithmetic (w=1)": ("task_arithmetic", {}, {"weight": 1.0}),
    "task_arithmetic (w=0.7)": ("task_arithmetic", {}, {"weight": 0.7}),
    "ties (density 0.5)": ("ties", {}, {"weight": 1.0, "density": 0.5}),
    "dare_linear (drop 0.5)": ("dare_linear", {}, {"weight": 1.0, "density": 0.5}),
    "dare_linear (drop 0.9)": ("dare_linear", {}, {"weight": 1.0, "density": 0.1}),
    "dare_linear (drop 0.99)": ("dare_linear", {}, {"weight": 1.0, "density": 0.01}),
    "dare_ties (drop 0.5)": ("dare_ties", {}, {"weight": 1.0, "density": 0.5}),
    "dare_ties (drop 0.9)": ("dare_ties", {}, {"weight": 1.0, "density": 0.1}),
    "slerp (t=0.5)": ("slerp", {"t": 0.5}, {}),
    "model_stock": ("model_stock", {}, {}),
}


def expert_recipe(method: str, params: dict, per_model: dict, a: Path, b: Path, base: Path) -> dict:
    recipe: dict = {"merge_method": method, "dtype": "float32"}
    if method == "slerp":
        recipe.update(base_model=str(a), models=[{"model": str(a)}, {"model": str(b)}])
    elif method == "linear":
        recipe["models"] = [{"model": str(m), "parameters": dict(per_model)} for m in (a, b)]
    else:
        recipe["base_model"] = str(base)
        recipe["models"] = [{"model": str(base)}] + [
            {"model": str(m), **({"parameters": dict(per_model)} if per_model else {})}
            for m in (a, b)
        ]
    if params:
        recipe["parameters"] = params
    return recipe


def task_vectors_gentle(b: Bench) -> tuple[str, dict]:
    return task_vectors(b, gentle=True)


def task_vectors(b: Bench, gentle: bool = False) -> tuple[str, dict]:
    a, r = b.experts(gentle)
    base = b.base()
    tasks = [b.test["arithmetic"], b.test["reversal"], b.test["copy"]]
    tag = "-gentle" if gentle else ""
    merged = {name: b.merged(f"tv{tag}-{i}", expert_recipe(*spec, a, r, base))
              for i, (name, spec) in enumerate(EXPERT_RECIPES.items())}  # fmt: skip
    s = scores([base, a, r, *merged.values()], tasks)
    ea, er = s[a.name, "arithmetic-test"], s[r.name, "reversal-test"]

    def row(label, path):
        ar, rv, cp = (s[path.name, f"{t}-test"] for t in ("arithmetic", "reversal", "copy"))
        return [label, ar, rv, cp, f"{100 * ar / ea:.0f}%", f"{100 * rv / er:.0f}%"]

    rows = [row("base", base), row("arithmetic expert", a), row("reversal expert", r)]
    rows += [row(name, p) for name, p in merged.items()]
    md = table(["model", "arithmetic", "reversal", "copy", "arithmetic % of expert",
                "reversal % of expert"], rows)  # fmt: skip
    return md, {"rows": rows}


def negation(b: Bench) -> tuple[str, dict]:
    a, _ = b.experts()
    base = b.base()
    multi = b.sweep()[2]  # the mixture fine-tune at lr 3e-3: good at both tasks
    tasks = [b.test["arithmetic"], b.test["reversal"], b.test["copy"]]
    merged = {}
    for lam in (0.5, 1.0, 1.5):
        recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
                  "models": [{"model": str(base)}, {"model": str(multi), "parameters": {"weight": 1.0}},
                             {"model": str(a), "parameters": {"weight": -lam}}]}  # fmt: skip
        merged[lam] = b.merged(f"negate-{lam:g}", recipe)
    s = scores([multi, *merged.values()], tasks)
    rows = [
        [
            "multitask model",
            *(s[multi.name, f"{t}-test"] for t in ("arithmetic", "reversal", "copy")),
        ]
    ]
    rows += [[f"multitask − {lam:g}·τ_arithmetic", *(s[p.name, f"{t}-test"] for t in ("arithmetic", "reversal", "copy"))]
             for lam, p in merged.items()]  # fmt: skip
    return table(["model", "arithmetic", "reversal", "copy"], rows), {"rows": rows}


def frankenmerge(b: Bench) -> tuple[str, dict]:
    a, r = b.experts()
    tasks = [b.test["arithmetic"], b.test["reversal"], b.test["copy"]]
    stacks = {
        "arithmetic[0:2] + reversal[0:2] (4 layers)": [(a, 0, 2), (r, 0, 2)],
        "reversal[0:2] + arithmetic[0:2] (4 layers)": [(r, 0, 2), (a, 0, 2)],
        "arithmetic[0:1] + reversal[1:2] (2 layers)": [(a, 0, 1), (r, 1, 2)],
        "arithmetic[0:2] + arithmetic[1:2] (3 layers, self-stack)": [(a, 0, 2), (a, 1, 2)],
    }
    merged = {}
    for i, (name, parts) in enumerate(stacks.items()):
        recipe = {"merge_method": "passthrough", "dtype": "float32",
                  "slices": [{"sources": [{"model": str(m), "layer_range": [lo, hi]}]} for m, lo, hi in parts]}  # fmt: skip
        merged[name] = b.merged(f"franken-{i}", recipe)
    s = scores([a, r, *merged.values()], tasks)
    cols = ("arithmetic", "reversal", "copy")
    rows = [["arithmetic expert", *(s[a.name, f"{t}-test"] for t in cols)],
            ["reversal expert", *(s[r.name, f"{t}-test"] for t in cols)]]  # fmt: skip
    rows += [[name, *(s[p.name, f"{t}-test"] for t in cols)] for name, p in merged.items()]
    return table(["model", *cols], rows), {"rows": rows}


def _flag(warning: str) -> str:
    """A `diff` warning, shortened for a table cell."""
    if warning.startswith("cosine"):
        return "cosine < 0.9"
    if "task vector of " in warning:
        who = Path(warning.split("task vector of ")[1].split(" is ")[0]).name
        return f"{who}: task vector > 50% of base"
    return warning


def divergent(b: Bench) -> tuple[str, dict]:
    same = b.sweep()[1:3]  # lr 1e-3 and 3e-3 fine-tunes of one base
    other_base = b.model("base-seed1", PRETRAIN, seed=100, steps=300, lr=3e-3)
    other = b.model("mix-lr0.003-base-seed1", MIX, init="base-seed1", seed=12, steps=150, lr=3e-3)
    pair_same, pair_diff = [same[0], same[1]], [same[1], other]

    def soup_of(name, pair):
        return b.merged(name, {"merge_method": "linear", "dtype": "float32",
                               "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in pair]})  # fmt: skip

    s_same, s_diff = (
        soup_of("soup-same-base", pair_same),
        soup_of("soup-different-bases", pair_diff),
    )
    sc = scores([*pair_same, other, s_same, s_diff], [b.test["mix"]])

    from mlxmerge.merge.diagnostics import diff_models

    base = b.base()
    rows = []
    for label, pair, soup_path in (
        ("same base", pair_same, s_same),
        ("different bases", pair_diff, s_diff),
    ):
        d = diff_models(str(pair[0]), str(pair[1]), str(base))
        o = d["overall"]
        rows.append([f"{label}: {pair[0].name} + {pair[1].name}", *(sc[m.name, "mix-test"] for m in pair),
                     sc[soup_path.name, "mix-test"], o["cosine"], o["task_norm_b"],
                     "; ".join(_flag(w) for w in d["warnings"]) or "none"])  # fmt: skip
    md = table(["pair", "model 1", "model 2", "uniform soup", "`diff` cosine",
                "`diff` task_norm_b", "`diff` warnings"], rows)  # fmt: skip
    return md, {"rows": rows, "other_base": str(other_base)}


def test_time(b: Bench) -> tuple[str, dict]:
    """Sampling N answers and voting, on a strong and on a weak arithmetic model."""
    from mlxmerge.cli.evaluate import write_plot
    from mlxmerge.errors import MlxmergeError
    from mlxmerge.eval.scoring import evaluate

    strong, _ = b.experts()
    weak, _ = b.experts(gentle=True)
    models = [str(strong), str(weak)]
    kw = {"max_tokens": 8, "batch_size": 200}
    report = evaluate(models, [b.test["arithmetic"]], samples=16, temperature=0.7, seed=0, **kw)
    greedy = evaluate(models, [b.test["arithmetic"]], **kw)
    try:
        write_plot(report, b.root / "test_time.png")
    except MlxmergeError as e:  # matplotlib missing: the table still stands
        log.warning("no plot: %s", e)
    rows, data = [], {}
    for r, g in zip(report["results"], greedy["results"]):
        name = Path(r["model"]).name
        rows.append([name, "greedy (T=0)", 1, g["score"], "", "", g["metrics"]["tokens"], ""])
        for c in r["metrics"]["curve"]:
            per = "-" if c["tokens_per_correct"] is None else f"{c['tokens_per_correct']:.1f}"
            rows.append([name, "T=0.7", c["samples"], c["majority"], c["best_of"], c["any_correct"],
                         c["tokens"], per])  # fmt: skip
        data[name] = r["metrics"]["curve"]
    md = table(["model", "decoding", "samples/prompt", "majority", "best-of", "any correct (pass@k)",
                "tokens", "tokens per correct (majority)"], rows)  # fmt: skip
    return md, data


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dir", type=Path, default=Path("/tmp/mlxmerge-quality"))
    p.add_argument("--only", default=",".join(SECTIONS))
    p.add_argument("--scale", type=float, default=1.0, help="Multiply every training run's steps.")
    p.add_argument("--fresh", action="store_true", help="Retrain the cached models.")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("mlxmerge",):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.fresh and (args.dir / "models").exists():
        shutil.rmtree(args.dir / "models")
    bench = Bench(args.dir, args.scale, False)
    out_md, out_json = [], {}
    for section in args.only.split(","):
        if section not in SECTIONS:
            raise SystemExit(f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")
        t0 = time.perf_counter()
        md, data = globals()[section](bench)
        data["seconds"] = time.perf_counter() - t0
        print(f"\n## {section}\n\n{md}\n", flush=True)
        out_md.append(f"## {section}\n\n{md}\n")
        out_json[section] = data
    out_json["train_seconds"] = bench.train_seconds
    print(
        "training seconds per model:",
        json.dumps({k: round(v, 1) for k, v in bench.train_seconds.items()}),
    )
    (args.dir / "results.md").write_text("\n".join(out_md))
    (args.dir / "results.json").write_text(json.dumps(out_json, indent=2, default=str))


if __name__ == "__main__":
    main()
