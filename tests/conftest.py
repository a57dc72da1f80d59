"""Shared fixtures: a family of tiny models built locally (no network)."""

from pathlib import Path

import pytest

import mlxmerge  # noqa: F401  (loads OpenBLAS before mlx)
from mlxmerge.demo.tiny import (
    build_model,
    build_tokenizer,
    model_from_config,
    save_weights,
    tiny_config,
)


def build_family(out: Path, seed: int = 0, spread: float = 0.02) -> dict[str, Path]:
    """A base model and two 'fine-tunes' of it (base + small seeded perturbations)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    tok = build_tokenizer(out / "tokenizer")
    config = tiny_config(hidden_size=64, num_layers=4)
    base = dict(tree_flatten(model_from_config(config, seed).parameters()))
    paths = {"base": save_weights(out / "base", base, config, tok, force=True, title="base")}
    for i, name in enumerate(("model_a", "model_b"), start=1):
        keys = mx.random.split(mx.random.key(seed * 1000 + i), len(base))
        tuned = {}
        for j, (k, v) in enumerate(sorted(base.items())):
            noise = mx.random.normal(v.shape, key=keys[j])
            tuned[k] = v + spread * mx.abs(v).mean() * noise
        paths[name] = save_weights(out / name, tuned, config, tok, force=True, title=name)
    return paths


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """tokenizer, base, model_a and model_b (fine-tune-like perturbations of base), plus odd ones."""
    from mlxmerge.demo.tiny import build_model

    root = tmp_path_factory.mktemp("family")
    paths = build_family(root, seed=0)
    tok = root / "tokenizer"
    paths["tokenizer"] = tok
    paths["wide"] = build_model(root / "wide", tok, seed=5, intermediate_size=96)
    paths["stranger"] = build_model(root / "stranger", tok, seed=7)  # a different random base
    paths["deep"] = build_model(root / "deep", tok, seed=8, num_layers=6)
    return paths


@pytest.fixture(scope="session")
def tiny_random(tmp_path_factory):
    """A random tiny Llama with the ChatML tokenizer, loaded with mlx-lm."""
    from mlx_lm import load

    root = tmp_path_factory.mktemp("eval_models")
    tok_dir = build_tokenizer(root / "tok")
    path = build_model(root / "llama", tok_dir, seed=3, num_layers=2)
    model, tokenizer = load(str(path))
    return path, model, tokenizer


@pytest.fixture(autouse=True, scope="session")
def _mlxmerge_cache(tmp_path_factory):
    """GGUF inputs keep their config/tokenizer folder in a cache: the tests' stay out of ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MLXMERGE_CACHE", str(tmp_path_factory.mktemp("mlxmerge-cache")))
    yield
    patch.undo()
