"""Orthogonalization math against numpy formulas written here."""

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.abliterate.architectures import (
    ARCHITECTURES,
    architecture,
    embedding_tensor,
    writer_tensors,
)  # fmt: skip
from mlxmerge.abliterate.orthogonalize import (
    orthogonalize_bias,
    orthogonalize_embedding,
    orthogonalize_weight,
    post_norm_direction,
)  # fmt: skip
from mlxmerge.errors import MlxmergeError

rng = np.random.default_rng(0)
D, N = 64, 96


def _unit(v):
    return v / np.linalg.norm(v)


def _rel(x, ref):
    return np.linalg.norm(x) / np.linalg.norm(ref)


@pytest.fixture
def wr():
    return rng.normal(size=(D, N)).astype(np.float32), _unit(rng.normal(size=D)).astype(np.float32)


def test_edited_weight_no_longer_writes_r(wr):
    w, r = wr
    w2 = np.array(orthogonalize_weight(mx.array(w), mx.array(r)))
    assert _rel(r @ w2, r @ w) < 1e-5
    # Same as the numpy formula W − r rᵀ W.
    np.testing.assert_allclose(w2, w - np.outer(r, r @ w), atol=1e-5)


def test_components_orthogonal_to_r_unchanged(wr):
    w, r = wr
    w2 = np.array(orthogonalize_weight(mx.array(w), mx.array(r)))
    p = np.eye(D) - np.outer(r, r)
    np.testing.assert_allclose(p @ w2, p @ w, atol=1e-5)


def test_idempotent_and_strength_scales_the_component(wr):
    w, r = wr
    once = orthogonalize_weight(mx.array(w), mx.array(r))
    twice = orthogonalize_weight(once, mx.array(r))
    np.testing.assert_allclose(np.array(twice), np.array(once), atol=1e-6)
    half = np.array(orthogonalize_weight(mx.array(w), mx.array(r), 0.5))
    np.testing.assert_allclose(r @ half, 0.5 * (r @ w), atol=1e-5)
    # r need not be unit length.
    np.testing.assert_allclose(np.array(orthogonalize_weight(mx.array(w), mx.array(3 * r))),
                               np.array(once), atol=1e-5)  # fmt: skip


def test_norm_preserving_keeps_column_norms_and_orthogonality(wr):
    w, r = wr
    w2 = np.array(orthogonalize_weight(mx.array(w), mx.array(r), norm_preserving=True))
    np.testing.assert_allclose(np.linalg.norm(w2, axis=0), np.linalg.norm(w, axis=0), rtol=1e-5)
    assert _rel(r @ w2, r @ w) < 1e-5
    again = np.array(orthogonalize_weight(mx.array(w2), mx.array(r), norm_preserving=True))
    np.testing.assert_allclose(again, w2, atol=1e-5)
    # Rescaling rows instead (heretic's choice) leaks r back: the reason for columns.
    plain = w - np.outer(r, r @ w)
    rows = (
        plain
        / np.linalg.norm(plain, axis=1, keepdims=True)
        * np.linalg.norm(w, axis=1, keepdims=True)
    )
    assert _rel(r @ rows, r @ w) > 1e-3


def test_bias_and_embedding(wr):
    _, r = wr
    b = rng.normal(size=D).astype(np.float32)
    b2 = np.array(orthogonalize_bias(mx.array(b), mx.array(r)))
    np.testing.assert_allclose(b2, b - r * (r @ b), atol=1e-6)
    e = rng.normal(size=(50, D)).astype(np.float32)  # (vocab, d_model)
    e2 = np.array(orthogonalize_embedding(mx.array(e), mx.array(r)))
    assert _rel(e2 @ r, e @ r) < 1e-5
    np.testing.assert_allclose(e2, e - np.outer(e @ r, r), atol=1e-5)
    e3 = np.array(orthogonalize_embedding(mx.array(e), mx.array(r), norm_preserving=True))
    np.testing.assert_allclose(np.linalg.norm(e3, axis=1), np.linalg.norm(e, axis=1), rtol=1e-5)


def test_stacked_experts_each_edited(wr):
    _, r = wr
    w = rng.normal(size=(5, D, N)).astype(np.float32)  # (experts, d_model, d_ff)
    w2 = np.array(orthogonalize_weight(mx.array(w), mx.array(r)))
    for e in range(5):
        assert _rel(r @ w2[e], r @ w[e]) < 1e-5
        np.testing.assert_allclose(w2[e], w[e] - np.outer(r, r @ w[e]), atol=1e-5)


def test_post_norm_correction_makes_the_residual_write_orthogonal(wr):
    w, r = wr
    g = (1.0 + rng.normal(size=D)).astype(np.float32)  # Gemma gain 1 + weight
    x = rng.normal(size=(N, 200)).astype(np.float32)

    def residual_write(weight):
        h = weight @ x
        return g[:, None] * h / np.sqrt((h**2).mean(0, keepdims=True) + 1e-6)  # RMSNorm output

    base = np.abs(r @ residual_write(w)).mean()
    plain = np.array(orthogonalize_weight(mx.array(w), mx.array(r)))
    fixed = np.array(
        orthogonalize_weight(mx.array(w), post_norm_direction(mx.array(r), mx.array(g)))
    )
    assert np.abs(r @ residual_write(plain)).mean() > 0.05 * base  # ablating r is not enough
    assert np.abs(r @ residual_write(fixed)).mean() < 1e-5 * base


LLAMA_NAMES = [
    "model.embed_tokens.weight",
    *(f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj.weight", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
        "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
    )),
]  # fmt: skip


def test_writers_found_by_role_not_shape():
    found = writer_tensors(LLAMA_NAMES, architecture("llama"))
    assert [w.name for w in found] == [
        f"model.layers.{i}.{m}" for i in range(2)
        for m in ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight")
    ]  # fmt: skip
    assert [w.layer for w in found] == [0, 0, 0, 1, 1, 1]
    assert embedding_tensor(LLAMA_NAMES, architecture("llama")) == "model.embed_tokens.weight"


def test_every_moe_expert_and_shared_expert_is_a_writer():
    names = [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(8)] + [
        "model.layers.0.mlp.shared_expert.down_proj.weight",
        "model.layers.0.mlp.switch_mlp.down_proj.weight",
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.experts.0.up_proj.weight",
    ]
    found = {w.name for w in writer_tensors(names, architecture("qwen2_moe"))}
    assert found == set(names[:10])
    mixtral = [f"model.layers.3.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)]
    assert len(writer_tensors(mixtral + ["model.layers.3.block_sparse_moe.experts.0.w1.weight"],
                              architecture("mixtral"))) == 4  # fmt: skip


def test_gemma_post_norms_are_resolved():
    names = [
        "language_model.model.layers.2.self_attn.o_proj.weight",
        "language_model.model.layers.2.mlp.down_proj.weight",
    ]
    found = writer_tensors(names, architecture("gemma3"))
    assert [w.norm_weight for w in found] == [
        "language_model.model.layers.2.post_attention_layernorm.weight",
        "language_model.model.layers.2.post_feedforward_layernorm.weight",
    ]
    assert ARCHITECTURES["gemma3"].gain_offset == 1.0 and ARCHITECTURES["olmo2"].gain_offset == 0.0


def test_unknown_model_type_is_an_error():
    with pytest.raises(
        MlxmergeError,
        match="abliterate does not support model_type 'mamba': no residual-writer entry",
    ):
        architecture("mamba")
