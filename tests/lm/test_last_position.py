"""Decoding computes the head on the last position only: the same logits as the full forward
pass's last position, on every architecture of the matrix (tests/archs.py)."""

from __future__ import annotations

import numpy as np
import pytest
from archs import ARCHS, build_arch, build_arch_tokenizer
from mlx import nn

from mlxmerge.lm.generate import _FINAL_NORMS, forward, make_batch_cache, pad_left
from mlxmerge.lm.load import load

ROWS = [[5, 9, 12, 40, 77, 3, 8], [21, 7, 99]]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_arch_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_last_position_head_equals_full_forward(name, tok, tmp_path):
    model, _ = load(build_arch(name, tmp_path / name, tok))
    inner = model.model
    # Every architecture of the matrix names its final norm one of these ways (else the full
    # head runs: correct, only slower).
    assert any(isinstance(inner.get(n), nn.Module) for n in _FINAL_NORMS)
    tokens, padding = pad_left(ROWS, 0)
    full = forward(model, tokens, make_batch_cache(model, padding))  # every position's logits
    ref = np.array(full[:, -1, :])
    got = forward(model, tokens, make_batch_cache(model, padding), last=True)
    assert got.shape[1] == 1
    np.testing.assert_allclose(np.array(got[:, -1, :]), ref, rtol=1e-5, atol=1e-5)
    # The model is left as it was: the full forward pass gives every position again.
    assert full.shape[1] == tokens.shape[1]
    assert forward(model, tokens, make_batch_cache(model, padding)).shape[1] == tokens.shape[1]
