"""Inference-time ablation (hooks) on a post-norm Gemma 3 and equality with the exported edit."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxmerge.abliterate.architectures import Architecture, Writer, architecture
from mlxmerge.abliterate.hooks import Instrumented

CONFIG = {
    "model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": 512, "rms_norm_eps": 1e-6, "sliding_window": 512, "sliding_window_pattern": 2,
    "max_position_embeddings": 2048, "query_pre_attn_scalar": 16, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 3,
}  # fmt: skip


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """A tiny Gemma 3 with random (non-trivial) post-norm gains, saved in float32."""
    from mlx_lm import load

    from mlxmerge.demo.tiny import build_tokenizer, model_from_config, save_weights

    model = model_from_config(CONFIG, seed=4)
    rng = np.random.default_rng(4)
    weights = dict(tree_flatten(model.parameters()))
    for k, v in list(weights.items()):
        if "norm" in k:
            weights[k] = mx.array(rng.normal(0, 0.5, size=v.shape).astype(np.float32))
    root = tmp_path_factory.mktemp("gemma")
    path = save_weights(root / "model", weights, CONFIG, build_tokenizer(root / "tok"))
    model, _ = load(str(path))  # tied LM head, as mlx-lm loads it
    r = rng.normal(size=64).astype(np.float32)
    return model, path, r / np.linalg.norm(r)


def _layer_writes(model, arch, r):
    inst = Instrumented(model, arch)
    tokens = mx.array([[1, 50, 60, 70, 80, 90, 100, 7]])
    with inst.installed():
        inst.set_ablation(mx.array(r), [1.0, 1.0], [1.0, 1.0])
        for p in inst.probes:
            p.slot.record = slice(None)
        logits = model(tokens)
        writes = [np.array(p.slot.outputs[0] - p.slot.inputs[0])[0] for p in inst.probes]
    return writes, np.array(logits)


def test_post_norm_correction_makes_each_layer_write_orthogonal_to_r(gemma):
    model, _, r = gemma
    writes, _ = _layer_writes(model, architecture("gemma3_text"), r)
    for w in writes:  # (positions, d): what each layer adds to the residual stream
        assert np.abs(w @ r).max() < 1e-4 * np.abs(w).max()
    # Ablating r itself before the post-norms (no correction) leaves a clear component.
    naive = Architecture((Writer(r"self_attn\.o_proj", "attn"), Writer(r"mlp\.down_proj", "mlp")))
    writes, _ = _layer_writes(model, naive, r)
    assert max(np.abs(w @ r).max() / np.abs(w).max() for w in writes) > 1e-2


def test_exported_edit_equals_the_inference_time_ablation(gemma, tmp_path):
    from mlx_lm import load

    from mlxmerge.abliterate.pipeline import orthogonalize_model

    model, path, r = gemma
    _, hooked = _layer_writes(model, architecture("gemma3_text"), r)
    out = orthogonalize_model(path, tmp_path / "edited", r, dtype="float32")
    assert out is None
    edited, _ = load(str(tmp_path / "edited"))
    logits = np.array(edited(mx.array([[1, 50, 60, 70, 80, 90, 100, 7]])))
    np.testing.assert_allclose(logits, hooked, rtol=1e-3, atol=1e-3)
    base = np.array(model(mx.array([[1, 50, 60, 70, 80, 90, 100, 7]])))
    assert np.abs(base - hooked).max() > 1e-2  # the edit did something


def test_norm_preserving_export_keeps_columns_and_post_norm_orthogonality(gemma, tmp_path):
    from mlxmerge.abliterate.orthogonalize import post_norm_direction
    from mlxmerge.io import open_checkpoint

    _, path, r = gemma
    orthogonalize_model_np(path, tmp_path / "np", r)
    base, out = open_checkpoint(path), open_checkpoint(tmp_path / "np")
    for i in range(2):
        for m, norm in (("self_attn.o_proj", "post_attention_layernorm"),
                        ("mlp.down_proj", "post_feedforward_layernorm")):  # fmt: skip
            w0 = np.array(base.get(f"model.layers.{i}.{m}.weight"))
            w1 = np.array(out.get(f"model.layers.{i}.{m}.weight"))
            g = 1.0 + base.get(f"model.layers.{i}.{norm}.weight")
            rr = np.array(post_norm_direction(mx.array(r), g))
            np.testing.assert_allclose(
                np.linalg.norm(w1, axis=0), np.linalg.norm(w0, axis=0), rtol=1e-5
            )
            assert np.linalg.norm(rr @ w1) < 1e-5 * np.linalg.norm(rr @ w0)


def orthogonalize_model_np(path, out, r):
    from mlxmerge.abliterate.pipeline import orthogonalize_model

    return orthogonalize_model(path, out, r, dtype="float32", norm_preserving=True)


def test_adapter_is_exact_on_a_quantized_base(gemma, tmp_path):
    from mlx_lm import load

    from mlxmerge.abliterate.adapter import export_adapter
    from mlxmerge.io import Quantization, open_checkpoint, write_model
    from mlxmerge.io.model_folder import ModelCard

    _, path, r = gemma
    ck = open_checkpoint(path)
    q = write_model(tmp_path / "q4", [(n, ck.shape(n)) for n in ck.names()], ck.get,
                    config=ck.config, tokenizer_source=ck.path, card=ModelCard("q4"),
                    quantize=Quantization(4, 32), dtype=mx.float32)  # fmt: skip
    export_adapter(q, tmp_path / "adapter", r, attn_weights=[1.0, 0.5], mlp_weights=[1.0, 1.0])
    quantized, _ = load(str(q))
    inst = Instrumented(quantized, architecture("gemma3_text"))
    tokens = mx.array([[1, 50, 60, 70, 80, 90, 100, 7]])
    with inst.installed():
        inst.set_ablation(mx.array(r), [1.0, 0.5], [1.0, 1.0])
        hooked = np.array(quantized(tokens))
    with_adapter, _ = load(str(q), adapter_path=str(tmp_path / "adapter"))
    np.testing.assert_allclose(np.array(with_adapter(tokens)), hooked, rtol=1e-3, atol=1e-3)
    assert np.abs(np.array(quantized(tokens)) - hooked).max() > 1e-2
