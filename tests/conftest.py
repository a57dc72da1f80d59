"""Shared fixtures: a family of tiny models built locally (no network)."""

import pytest

import mlxmerge  # noqa: F401  (loads OpenBLAS before mlx)


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """tokenizer, base, model_a and model_b (fine-tune-like perturbations of base), plus odd ones."""
    from mlxmerge.demo import build_family
    from mlxmerge.tiny import build_model

    root = tmp_path_factory.mktemp("family")
    paths = build_family(root, seed=0)
    tok = root / "tokenizer"
    paths["tokenizer"] = tok
    paths["wide"] = build_model(root / "wide", tok, seed=5, intermediate_size=96)
    paths["stranger"] = build_model(root / "stranger", tok, seed=7)  # a different random base
    paths["deep"] = build_model(root / "deep", tok, seed=8, num_layers=6)
    return paths
