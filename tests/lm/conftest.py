import pytest

import mlxmerge  # noqa: F401  (BLAS before mlx.core)
from mlxmerge.demo.tiny import build_model, build_tokenizer


@pytest.fixture(scope="session")
def tiny_random(tmp_path_factory):
    """A random tiny Llama with the ChatML tokenizer, loaded with mlx-lm."""
    from mlx_lm import load

    root = tmp_path_factory.mktemp("eval_models")
    tok_dir = build_tokenizer(root / "tok")
    path = build_model(root / "llama", tok_dir, seed=3, num_layers=2)
    model, tokenizer = load(str(path))
    return path, model, tokenizer
