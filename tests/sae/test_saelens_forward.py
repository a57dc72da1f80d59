"""SAELens folders trained elsewhere: every cfg field that changes the forward is reproduced or refused.

The references are SAELens's inference formulas written in numpy here (sae_lens 6.x,
saes/topk_sae.py and saes/jumprelu_sae.py):
  topk:     pre = (x − b_dec·apply) W_enc + b_enc;  if rescale: pre ·= ‖W_dec‖ (per latent row)
            z = scatter(ReLU(topk(pre)));  x̂ = (z / ‖W_dec‖ if rescale else z) W_dec + b_dec
  jumprelu: z = ReLU(pre) · [pre > threshold]
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from mlxmerge.cli import cli
from mlxmerge.sae.model import SAEError, decode, encode
from mlxmerge.sae.saelens import load_sae, save_sae


def _weights(rng, d_in, d_sae, jump=False):
    w = {
        "W_enc": rng.standard_normal((d_in, d_sae)).astype(np.float32),
        "b_enc": rng.standard_normal(d_sae).astype(np.float32),
        # decoder rows of very different norms, so rescaling changes which latents win
        "W_dec": (rng.standard_normal((d_sae, d_in)) * rng.uniform(0.05, 5, (d_sae, 1))).astype(
            np.float32
        ),
        "b_dec": rng.standard_normal(d_in).astype(np.float32),
    }
    if jump:
        w["threshold"] = rng.random(d_sae).astype(np.float32)
    return w


def _folder(path, w, **cfg):
    path.mkdir()
    save_file(w, str(path / "sae_weights.safetensors"))
    base = {"d_in": w["W_enc"].shape[0], "d_sae": w["W_enc"].shape[1], "dtype": "float32",
            "apply_b_dec_to_input": True, "normalize_activations": "none",
            "metadata": {"sae_lens_version": "6.22.0", "hook_name": "blocks.1.hook_resid_post"}}  # fmt: skip
    (path / "cfg.json").write_text(json.dumps({**base, **cfg}))
    return path


def saelens_topk(w, x, k, rescale, apply_b_dec=True):
    pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
    n = np.linalg.norm(w["W_dec"], axis=-1)
    if rescale:
        pre = pre * n
    idx = np.argsort(-pre, axis=-1)[:, :k]
    z = np.zeros_like(pre)
    np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    out = (z / n if rescale else z) @ w["W_dec"] + w["b_dec"]
    return z, out


@pytest.mark.parametrize("rescale", [True, False])
def test_topk_rescale_acts_by_decoder_norm_matches_saelens(tmp_path, rescale):
    rng = np.random.default_rng(0)
    d_in, d_sae, k = 16, 64, 6
    w = _weights(rng, d_in, d_sae)
    folder = _folder(tmp_path / "s", w, architecture="topk", k=k,
                     rescale_acts_by_decoder_norm=rescale)  # fmt: skip
    cfg, p = load_sae(folder)
    x = rng.standard_normal((50, d_in)).astype(np.float32)
    z_ref, out_ref = saelens_topk(w, x, k, rescale)
    z = np.array(encode(p, cfg, mx.array(x)))
    assert ((z != 0) == (z_ref != 0)).all()  # the same latents fire on every token
    np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(decode(p, mx.array(z))), out_ref, rtol=1e-4, atol=1e-4)
    if rescale:  # the flag matters on this SAE: plain TopK picks other latents
        z_plain, _ = saelens_topk(w, x, k, False)
        assert ((z_plain != 0) != (z_ref != 0)).any()
        # saving the loaded SAE back gives a folder whose plain forward is the same
        save_sae(tmp_path / "back", cfg, p)
        cfg2, p2 = load_sae(tmp_path / "back")
        np.testing.assert_allclose(np.array(encode(p2, cfg2, mx.array(x))), z, atol=1e-5)


def test_bf16_folder_runs_in_float32_on_the_stored_values(tmp_path):
    rng = np.random.default_rng(1)
    w = _weights(rng, 8, 24, jump=True)
    (tmp_path / "b").mkdir()
    mx.save_safetensors(
        str(tmp_path / "b" / "sae_weights.safetensors"),
        {n: mx.array(v).astype(mx.bfloat16) for n, v in w.items()},
    )
    cfg = {"architecture": "jumprelu", "d_in": 8, "d_sae": 24, "dtype": "bfloat16",
           "apply_b_dec_to_input": False, "metadata": {"sae_lens_version": "6.22.0"}}  # fmt: skip
    (tmp_path / "b" / "cfg.json").write_text(json.dumps(cfg))
    c, p = load_sae(tmp_path / "b")
    stored = {n: np.array(mx.array(v).astype(mx.bfloat16).astype(mx.float32)) for n, v in w.items()}
    x = rng.standard_normal((9, 8)).astype(np.float32)
    pre = x @ stored["W_enc"] + stored["b_enc"]
    z_ref = np.maximum(pre, 0) * (pre > stored["threshold"])
    np.testing.assert_allclose(np.array(encode(p, c, mx.array(x))), z_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "field,value",
    [
        ("reshape_activations", "hook_z"),
        ("normalize_activations", "constant_norm_rescale"),
        ("dtype", "int8"),
        ("finetuning_scaling_factor", True),
    ],
)
def test_unimplemented_maths_fields_are_refused_by_name(tmp_path, field, value):
    rng = np.random.default_rng(2)
    folder = _folder(tmp_path / "s", _weights(rng, 8, 16, jump=True), architecture="jumprelu",
                     **{field: value})  # fmt: skip
    with pytest.raises(SAEError, match=f"{field}={value!r} changes the SAE's forward pass"):
        load_sae(folder)
    # and through the CLI: one line, non-zero exit, before any model is loaded
    r = CliRunner().invoke(cli, ["sae", "eval", str(folder), "no-such-model", "--data", "x.txt"])
    assert r.exit_code == 1
    assert f"{field}={value!r} changes the SAE's forward pass" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_zero_decoder_row_with_rescale_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    w = _weights(rng, 8, 16)
    w["W_dec"][5] = 0
    folder = _folder(tmp_path / "s", w, architecture="topk", k=2, rescale_acts_by_decoder_norm=True)
    with pytest.raises(SAEError, match=r"W_dec rows \[5\] have zero norm"):
        load_sae(folder)


def test_training_checkpoint_input_scale_is_folded_after_the_decoder_norms(tmp_path):
    # SAELens's trainer feeds s·x to the SAE and divides its output by s (activation_scaler.json);
    # the final save folds s in. A checkpoint folder keeps s apart: reproduce the same maths.
    rng = np.random.default_rng(4)
    d_in, d_sae, k, s = 12, 48, 5, 2.5
    w = _weights(rng, d_in, d_sae)
    folder = _folder(tmp_path / "ckpt", w, architecture="topk", k=k,
                     rescale_acts_by_decoder_norm=True,
                     normalize_activations="expected_average_only_in")  # fmt: skip
    with pytest.raises(SAEError, match="expected_average_only_in' needs the input scale"):
        load_sae(folder)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
    cfg, p = load_sae(folder)
    x = rng.standard_normal((40, d_in)).astype(np.float32)
    z_ref, out_ref = saelens_topk(w, s * x, k, rescale=True)
    z = np.array(encode(p, cfg, mx.array(x)))
    assert ((z != 0) == (z_ref != 0)).all()
    np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(decode(p, mx.array(z))), out_ref / s, rtol=1e-4, atol=1e-4)
