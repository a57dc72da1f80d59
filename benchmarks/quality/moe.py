"""Mixture of experts (``mlxmerge moe``) against each expert alone and a linear merge.

    python benchmarks/quality/moe.py --dir /tmp/mlxmerge-quality     # reuses run.py's models

Two sets of experts from run.py's base (pretrained on copy; tiny Llama, hidden 64, 2 layers,
intermediate 192): run.py's full fine-tunes on arithmetic and on reversal, and MLP-only fine-tunes
(attention, norms and embeddings frozen: the setting mergekit-moe assumes, where an expert's skill
lives in its MLP). Each MoE takes attention and embeddings from the base and one expert MLP per
fine-tune; the base itself is the third expert ("copy") in the three-expert rows; "base + X's MLP"
is the one-expert MoE, the most any router can recover of X. Routers come from 16 training prompts
per task (``gate_mode: hidden`` unless named). Scores: exact match on 200 held-out prompts per task.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import examples, scores, table
from run import Bench

import mlxmerge  # noqa: F401

TASKS = ("arithmetic", "reversal", "copy")


def prompts(task: str, n: int = 16, answers: bool = False) -> list[str]:
    """Training prompts (seed < 1000); ``answers``: with the answer, so the last token differs by task."""
    return [p + (a if answers else "") for p, a in examples(task, n, seed=7)]


@contextlib.contextmanager
def mlp_only():
    """Make ``common.train`` fine-tune only the MLPs: the model it loads comes back frozen
    except for ``layers[i].mlp`` (MLX trains ``trainable_parameters`` only)."""
    import mlx_lm

    load = mlx_lm.load

    def frozen(path, *args, **kwargs):
        model, tok = load(path, *args, **kwargs)
        model.freeze()
        for layer in model.layers:
            layer.mlp.unfreeze()
        return model, tok

    mlx_lm.load = frozen
    try:
        yield
    finally:
        mlx_lm.load = load


def mlp_experts(b: Bench) -> tuple[Path, Path]:
    b.base()
    with mlp_only():
        a = b.model("mlp-expert-arithmetic", {"arithmetic": 1.0}, init="base", seed=1,
                    steps=300, lr=3e-3)  # fmt: skip
        r = b.model("mlp-expert-reversal", {"reversal": 1.0}, init="base", seed=2,
                    steps=300, lr=3e-3)  # fmt: skip
    return a, r


def linear(b: Bench, name: str, models: list[Path]) -> Path:
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}  # fmt: skip
    return b.merged(name, recipe)


def build_moe(
    b: Bench, name: str, experts: list[tuple[Path, str]], negatives: bool = False,
    answers: bool = False, **kw,
) -> Path:  # fmt: skip
    """``negatives``: each expert's negative prompts are the other experts' positive prompts."""
    from mlxmerge.merge.moe import moe

    def spec(path: Path, task: str) -> dict:
        neg = [q for _, t in experts if t != task for q in prompts(t)] if negatives else []
        return {"source_model": str(path), "positive_prompts": prompts(task, answers=answers),
                "negative_prompts": neg}  # fmt: skip

    cfg = {"base_model": str(b.base()), "dtype": "float32",
           "experts": [spec(p, t) for p, t in experts], **kw}  # fmt: skip
    return moe(cfg, b.root / "moe" / name, force=True)


def routed_right(moe_path: Path, expert_tasks: list[str], n: int = 50) -> dict[str, float]:
    """Per task: the share of (token, layer) pairs of held-out prompt+answer sequences whose
    top-1 expert is that task's expert."""
    import mlx.core as mx
    import mlx_lm
    from mlx import nn

    model, tok = mlx_lm.load(str(moe_path))
    picks: list[mx.array] = []

    class Record(nn.Module):
        def __init__(self, gate):
            super().__init__()
            self.gate = gate

        def __call__(self, x):
            y = self.gate(x)
            picks.append(mx.argmax(y, axis=-1))
            return y

    for layer in model.layers:
        layer.block_sparse_moe.gate = Record(layer.block_sparse_moe.gate)
    out = {}
    for e, task in enumerate(expert_tasks):
        right = total = 0
        for p, a in examples(task, n, seed=2000):
            picks.clear()
            model(mx.array([tok.encode(p + a)]))
            hits = mx.concatenate([x.reshape(-1) for x in picks]) == e
            right, total = right + hits.sum().item(), total + hits.size
        out[task] = right / total
    return out


def rows_for(b: Bench, tag: str, arith: Path, rev: Path) -> dict[str, Path]:
    base = b.base()
    two = [(arith, "arithmetic"), (rev, "reversal")]
    three = [*two, (base, "copy")]
    return {
        f"{tag}: arithmetic expert": arith,
        f"{tag}: reversal expert": rev,
        f"{tag}: base + arithmetic MLP": build_moe(b, f"{tag}-one-a", two[:1], experts_per_token=1),
        f"{tag}: base + reversal MLP": build_moe(b, f"{tag}-one-r", two[1:], experts_per_token=1),
        f"{tag}: linear merge of the 2": linear(b, f"{tag}-linear2", [arith, rev]),
        f"{tag}: linear merge of the 3": linear(b, f"{tag}-linear3", [arith, rev, base]),
        f"{tag}: MoE 2 experts, top-1": build_moe(b, f"{tag}-moe2-k1", two, experts_per_token=1),
        f"{tag}: MoE 2 experts, top-2": build_moe(b, f"{tag}-moe2-k2", two, experts_per_token=2),
        f"{tag}: MoE 2, top-1, negatives": build_moe(
            b, f"{tag}-moe2-neg", two, negatives=True, experts_per_token=1
        ),
        f"{tag}: MoE 2, top-1, prompts with answers": build_moe(
            b, f"{tag}-moe2-ans", two, answers=True, experts_per_token=1
        ),
        f"{tag}: MoE 2, top-1, cheap_embed": build_moe(
            b, f"{tag}-moe2-cheap", two, experts_per_token=1, gate_mode="cheap_embed"
        ),
        f"{tag}: MoE 2, top-1, random": build_moe(
            b, f"{tag}-moe2-random", two, experts_per_token=1, gate_mode="random"
        ),
        f"{tag}: MoE 3 (+base), top-1": build_moe(b, f"{tag}-moe3-k1", three, experts_per_token=1),
        f"{tag}: MoE 3 (+base), top-2": build_moe(b, f"{tag}-moe3-k2", three, experts_per_token=2),
        f"{tag}: MoE 3 (+base), top-1, negatives": build_moe(
            b, f"{tag}-moe3-neg", three, negatives=True, experts_per_token=1
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("/tmp/mlxmerge-quality"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("mlxmerge").setLevel(logging.ERROR)
    b = Bench(args.dir, 1.0, False)
    models = {"base (copy)": b.base()}
    models.update(rows_for(b, "full", *b.experts()))
    models.update(rows_for(b, "MLP-only", *mlp_experts(b)))
    s = scores(list(models.values()), [b.test[t] for t in TASKS])
    rows = []
    for label, path in models.items():
        routed = ""
        if "MoE 2, top-1" in label or "MoE 2 experts, top-1" in label:
            r = routed_right(path, ["arithmetic", "reversal"])
            routed = f"{r['arithmetic']:.2f} / {r['reversal']:.2f}"
        rows.append([label] + [s[path.name, f"{t}-test"] for t in TASKS] + [routed])
    md = table(["model", *TASKS, "routed right (arith / rev)"], rows)
    print(f"\n{md}\n", flush=True)
    (args.dir / "moe-results.md").write_text(md + "\n")
    (args.dir / "moe-results.json").write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
