"""A base model and a fine-tune of it whose change is exactly rank 4 in every linear layer."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from lora_helpers import RANK, load_weights, low_rank_change

from mlxmerge.demo.tiny import save_weights


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
