"""A base model and a fine-tune of it whose change is exactly rank 4 in every linear layer."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlxmerge.tiny import save_weights

RANK = 4


def load_weights(folder) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def low_rank_change(w: mx.array, rank: int, key) -> mx.array:
    """A rank-``rank`` matrix with a spread spectrum, a quarter of ``w``'s norm."""
    k1, k2 = mx.random.split(key)
    u = mx.linalg.qr(mx.random.normal((w.shape[0], rank), key=k1), stream=mx.cpu)[0]
    v = mx.linalg.qr(mx.random.normal((w.shape[1], rank), key=k2), stream=mx.cpu)[0]
    s = mx.array([1.0, 0.6, 0.35, 0.2][:rank])
    d = (u * s) @ v.T
    return d * (0.25 * mx.linalg.norm(w) / mx.linalg.norm(d))


@pytest.fixture(scope="session")
def lowrank(family, tmp_path_factory):
    """base, its rank-4 fine-tune ``ft`` (linear layers only) and the changes ``deltas``."""
    root = tmp_path_factory.mktemp("lowrank")
    base = load_weights(family["base"])
    config = json.loads((family["base"] / "config.json").read_text())
    deltas, tuned = {}, {}
    for i, (name, w) in enumerate(sorted(base.items())):
        if w.ndim == 2 and ".layers." in name:
            deltas[name] = low_rank_change(w, RANK, mx.random.key(100 + i))
            tuned[name] = w + deltas[name]
        else:
            tuned[name] = w
    mx.eval(tuned, deltas)
    ft = save_weights(root / "ft", tuned, config, family["tokenizer"], force=True, title="ft")
    return {"base": family["base"], "ft": ft, "deltas": deltas, "root": root,
            "tokenizer": family["tokenizer"], "config": config}  # fmt: skip
