"""Session fixtures: a tiny model, a text file, cached activations and a trained SAE."""

from __future__ import annotations

import json

import pytest

import mlxmerge  # noqa: F401  (BLAS before mlx.core)
from mlxmerge.demo.tiny import _corpus, build_model, build_tokenizer


@pytest.fixture(scope="session")
def sae_root(tmp_path_factory):
    return tmp_path_factory.mktemp("sae")


@pytest.fixture(scope="session")
def tiny_model(sae_root):
    tok = build_tokenizer(sae_root / "tok")
    return build_model(sae_root / "model", tok, seed=0, hidden_size=64, num_layers=3)


@pytest.fixture(scope="session")
def text_file(sae_root):
    path = sae_root / "data.txt"
    path.write_text("\n".join(_corpus(200, seed=5)))
    return path


@pytest.fixture(scope="session")
def jsonl_file(sae_root):
    path = sae_root / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in _corpus(50, seed=6)))
    return path


@pytest.fixture(scope="session")
def acts_dir(sae_root, tiny_model, text_file):
    from mlxmerge.sae import collect

    collect(tiny_model, [0, 2], text_file, sae_root / "acts", tokens=3000, shard_tokens=1000,
            context_size=64)  # fmt: skip
    return sae_root / "acts"


@pytest.fixture(scope="session")
def trained_sae(sae_root, acts_dir):
    from mlxmerge.sae import train

    summary = train(sae_root / "sae", acts=acts_dir, layer=2, k=8, expansion=4, tokens=256 * 60,
                    batch_size=256, log_every=20)  # fmt: skip
    return sae_root / "sae", summary
