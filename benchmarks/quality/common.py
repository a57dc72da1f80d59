"""The shared small trainer and synthetic tasks of the quality benchmarks.

Everything is local and seeded: a byte-level tokenizer, a tiny Llama (hidden 64, 2 layers),
and three string tasks whose held-out answers are exact:

    arithmetic  "7+5=" → "12"          (single-digit addition facts)
    reversal    "rev kdab=" → "badk"   (reverse 3-5 letters)
    copy        "cp kdab=" → "kdab"    (the 'pretraining' skill both experts start from)

``pretrain`` trains the base on copy plus a little of both tasks; ``finetune`` continues from a
model folder on one task mixture. Models are written with ``mlxmerge.demo.tiny.save_weights`` in
float32, so ``mlx_lm.load`` and every mlxmerge command read them.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten

import mlxmerge  # noqa: F401  (loads OpenBLAS before mlx)
from mlxmerge.demo.tiny import build_tokenizer, model_from_config, save_weights, tiny_config

log = logging.getLogger("quality")

LETTERS = "abcdefghijklmnop"
CONFIG = {
    "hidden_size": 64,
    "num_layers": 2,
    "intermediate_size": 192,
    "num_heads": 4,
    "num_kv_heads": 2,
}


def arithmetic(rng: random.Random) -> tuple[str, str]:
    # Single-digit facts: a 2-layer model learns them in a few hundred steps (two-digit sums with
    # carries take thousands). 100 facts, so the test measures retention rather than generalization.
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a}+{b}=", str(a + b)


def _letters(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))


def reversal(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return f"rev {s}=", s[::-1]


def copy(rng: random.Random) -> tuple[str, str]:
    # Letters and digits, so pretraining teaches every character the two tasks use.
    s = "".join(rng.choice(LETTERS + "0123456789") for _ in range(rng.randint(3, 5)))
    return f"cp {s}=", s


TASKS = {"arithmetic": arithmetic, "reversal": reversal, "copy": copy}


def examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"{task}-{seed}")
    return [TASKS[task](rng) for _ in range(n)]


def write_generation_task(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return path


def held_out(folder: Path, task: str, n: int = 200) -> tuple[Path, Path]:
    """(validation, test) generation files; seeds 1000/2000 never appear in training (seed < 1000)."""
    val = write_generation_task(folder / f"{task}-val.jsonl", examples(task, n, 1000))
    test = write_generation_task(folder / f"{task}-test.jsonl", examples(task, n, 2000))
    return val, test


def make_tokenizer(folder: Path) -> Path:
    # vocab 260 = 256 bytes + 4 specials: no merges, one token per character.
    corpus = [p + a for t in TASKS for p, a in examples(t, 200, 0)]
    return build_tokenizer(folder, vocab_size=260, corpus=corpus)


@dataclass
class Run:
    path: Path
    seconds: float
    steps: int
    final_loss: float


SEQ_LEN = 18  # longest example: BOS + "rev abcde=" + "edcba" + EOS = 17


class Encoder:
    """Character → token id of the byte-level tokenizer (no merges), cached for speed."""

    def __init__(self, tok):
        self.tok = tok
        self.bos = tok.encode("")[0]
        self.eos = tok.eos_token_id
        self.ids = {
            c: tok.encode(c, add_special_tokens=False)[0] for c in "0123456789+=rcvp " + LETTERS
        }

    def batch(self, rows: list[tuple[str, str]]) -> tuple[mx.array, mx.array]:
        """Tokens (B, SEQ_LEN) and a loss mask (B, SEQ_LEN-1) over the answer and the stop token."""
        tokens, masks = [], []
        for p, a in rows:
            pi = [self.bos] + [self.ids[c] for c in p]
            ai = [self.ids[c] for c in a] + [self.eos]
            seq = pi + ai
            tokens.append(seq + [0] * (SEQ_LEN - len(seq)))
            m = [0] * (len(pi) - 1) + [1] * len(ai)
            masks.append(m + [0] * (SEQ_LEN - 1 - len(m)))
        return mx.array(tokens), mx.array(masks, dtype=mx.float32)


def train(
    out: Path, tokenizer_dir: Path, mixture: dict[str, float], *, init: Path | None = None,
    seed: int = 0, steps: int = 300, lr: float = 3e-3, batch_size: int = 64, warmup: int = 20,
    model_config: dict | None = None,
) -> Run:  # fmt: skip
    """Train from ``init`` (a model folder) or from a seeded random init (of ``model_config``,
    default ``CONFIG``); write to ``out``."""
    import mlx_lm
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    if init is None:
        config = tiny_config(vocab_size=260, **(model_config or CONFIG))
        model = model_from_config(config, seed)
    else:
        model, _ = mlx_lm.load(str(init))
        config = json.loads((Path(init) / "config.json").read_text())
    rng = random.Random(f"train-{seed}-{sorted(mixture.items())}")
    names, weights = zip(*mixture.items())
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(lr * 0.1, lr, warmup),
            optim.cosine_decay(lr, max(steps - warmup, 1), lr * 0.1),
        ],
        [warmup],
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.0)

    def loss_fn(model, tokens, mask):
        logits = model(tokens[:, :-1]).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
        return (ce * mask).sum() / mask.sum()

    state = [model.state, opt.state]

    def step(tokens, mask):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, tokens, mask)
        opt.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    enc = Encoder(tok)
    t0 = time.perf_counter()
    loss = mx.array(0.0)
    for _ in range(steps):
        tokens, mask = enc.batch(
            [TASKS[rng.choices(names, weights)[0]](rng) for _ in range(batch_size)]
        )
        loss = step(tokens, mask)
        mx.eval(state, loss)
    seconds = time.perf_counter() - t0
    weights_out = dict(tree_flatten(model.parameters()))
    save_weights(out, weights_out, config, tokenizer_dir, force=True, title=out.name)
    log.info("trained %s: %d steps in %.1fs, loss %.3f", out.name, steps, seconds, loss.item())
    return Run(out, seconds, steps, loss.item())


def scores(
    models: list[Path], tasks: list[Path], batch_size: int = 100
) -> dict[tuple[str, str], float]:
    """Exact match of every model on every generation task, through ``mlxmerge.eval``."""
    from mlxmerge.eval.scoring import evaluate

    report = evaluate([str(m) for m in models], tasks, batch_size=batch_size, max_tokens=8)
    return {(Path(r["model"]).name, r["task"]): r["score"] for r in report["results"]}


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table (what the docs and the README show)."""

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
