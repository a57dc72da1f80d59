"""SAELens v6 folders: loader rules, bit-exact round trip, SAEs written by other tools."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlxmerge.sae.model import SAEConfig, SAEError, encode, init_params, reconstruct
from mlxmerge.sae.saelens import load_sae, save_sae


def _random_sae(arch="topk", d_in=12, d_sae=40, k=5, seed=0):
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, hook_layer=3,
                    metadata={"model_name": "/models/tiny", "quantization": {"bits": 4}})  # fmt: skip
    p = init_params(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for name in ("encoder", "b_enc", "W_dec", "b_dec"):
        p[name] = mx.array(rng.standard_normal(p[name].shape).astype(np.float32))
    if arch == "jumprelu":
        p["threshold"] = mx.array(rng.random(d_sae).astype(np.float32))
    return cfg, p


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("-")[0].split(".")[:3])


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_saved_folder_follows_saelens_loader_rules(tmp_path, arch):
    cfg, p = _random_sae(arch)
    save_sae(tmp_path / "s", cfg, p, sparsity=np.full(40, 0.01))
    raw = json.loads((tmp_path / "s" / "cfg.json").read_text())
    # v6 path: sae_lens_version in metadata and >= 6.0.0
    assert _version_tuple(raw["metadata"]["sae_lens_version"]) >= (6, 0, 0)
    for key in (
        "architecture",
        "d_in",
        "d_sae",
        "dtype",
        "apply_b_dec_to_input",
        "normalize_activations",
    ):
        assert key in raw, key
    assert raw["architecture"] == {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}[arch]
    assert raw["normalize_activations"] == "none" and raw["dtype"] == "float32"
    if arch == "topk":  # explicit k: SAELens would silently use 100
        assert raw["k"] == 5 and raw["rescale_acts_by_decoder_norm"] is False
    assert raw["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert raw["metadata"]["model_name"] == "/models/tiny"
    assert raw["metadata"]["quantization"] == {"bits": 4}
    w = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))  # read by another library
    expected = {"W_enc": (12, 40), "b_enc": (40,), "W_dec": (40, 12), "b_dec": (12,)}
    if arch == "jumprelu":
        expected["threshold"] = (40,)
    assert {k: v.shape for k, v in w.items()} == expected  # strict state dict: no extra keys
    np.testing.assert_array_equal(w["W_enc"], np.array(p["encoder"]).T)
    sparsity = load_file(str(tmp_path / "s" / "sparsity.safetensors"))["sparsity"]
    np.testing.assert_allclose(sparsity, np.log10(0.01), rtol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_round_trip_is_bit_exact(tmp_path, arch):
    cfg, p = _random_sae(arch)
    save_sae(tmp_path / "s", cfg, p)
    cfg2, p2 = load_sae(tmp_path / "s")
    assert set(p2) == set(p)
    for name in p:
        assert np.array_equal(np.array(p[name]), np.array(p2[name])), name
    assert (cfg2.d_in, cfg2.d_sae, cfg2.architecture, cfg2.hook_layer) == (12, 40, arch, 3)
    assert cfg2.k == 5 or arch != "topk"
    x = mx.random.normal((7, 12), key=mx.random.key(0))
    assert np.array_equal(np.array(reconstruct(p, cfg, x)), np.array(reconstruct(p2, cfg2, x)))


def test_loads_a_jumprelu_sae_written_elsewhere(tmp_path):
    """A Gemma-Scope-like folder written with safetensors/numpy; encode checked against numpy."""
    rng = np.random.default_rng(1)
    d_in, d_sae = 10, 30
    w = {"W_enc": rng.standard_normal((d_in, d_sae)).astype(np.float32),
         "b_enc": rng.standard_normal(d_sae).astype(np.float32),
         "W_dec": rng.standard_normal((d_sae, d_in)).astype(np.float32),
         "b_dec": rng.standard_normal(d_in).astype(np.float32),
         "threshold": rng.random(d_sae).astype(np.float32)}  # fmt: skip
    (tmp_path / "g").mkdir()
    save_file(w, str(tmp_path / "g" / "sae_weights.safetensors"))
    cfg = {"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "torch.float32",
           "apply_b_dec_to_input": False, "normalize_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.7.hook_resid_post"}}  # fmt: skip
    (tmp_path / "g" / "cfg.json").write_text(json.dumps(cfg))
    c, p = load_sae(tmp_path / "g")
    x = rng.standard_normal((5, d_in)).astype(np.float32)
    pre = x @ w["W_enc"] + w["b_enc"]  # no b_dec subtraction: apply_b_dec_to_input false
    z = np.maximum(pre, 0) * (pre > w["threshold"])
    np.testing.assert_allclose(np.array(encode(p, c, mx.array(x))), z, rtol=1e-5, atol=1e-5)
    assert c.hook_layer == 7


def test_loads_a_pre_v6_topk_cfg(tmp_path):
    cfg, p = _random_sae("topk", k=3)
    save_sae(tmp_path / "s", cfg, p)
    legacy = {"d_in": 12, "d_sae": 40, "activation_fn": "topk", "activation_fn_kwargs": {"k": 3},
              "hook_point": "blocks.1.hook_resid_post", "apply_b_dec_to_input": True}  # fmt: skip
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(legacy))
    c, _ = load_sae(tmp_path / "s")
    assert (c.architecture, c.k, c.hook_layer) == ("topk", 3, 1)


def test_bad_folders_are_clear_errors(tmp_path):
    cfg, p = _random_sae("topk")
    save_sae(tmp_path / "s", cfg, p)
    with pytest.raises(SAEError, match="no cfg.json"):
        load_sae(tmp_path / "nowhere")
    w = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    save_file(
        {**w, "W_dec": w["W_dec"][:, :5].copy()}, str(tmp_path / "s" / "sae_weights.safetensors")
    )
    with pytest.raises(SAEError, match=r"W_dec is \(40, 5\), expected \(40, 12\)"):
        load_sae(tmp_path / "s")
    save_file({**w, "extra": w["b_dec"]}, str(tmp_path / "s" / "sae_weights.safetensors"))
    with pytest.raises(SAEError, match="unexpected tensors"):
        load_sae(tmp_path / "s")
    save_file(
        {k: v for k, v in w.items() if k != "b_enc"},
        str(tmp_path / "s" / "sae_weights.safetensors"),
    )
    with pytest.raises(SAEError, match="tensor b_enc is missing"):
        load_sae(tmp_path / "s")
    raw = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**raw, "architecture": "gated"}))
    with pytest.raises(SAEError, match="architecture 'gated' is not supported"):
        load_sae(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(
        json.dumps({**raw, "normalize_activations": "layer_norm"})
    )
    with pytest.raises(SAEError, match="normalize_activations='layer_norm'"):
        load_sae(tmp_path / "s")


def _with_hook(tmp_path, hook):
    cfg, p = _random_sae()
    folder = save_sae(tmp_path / hook, cfg, p)
    raw = json.loads((folder / "cfg.json").read_text())
    raw["metadata"]["hook_name"] = hook
    (folder / "cfg.json").write_text(json.dumps(raw))
    return load_sae(folder)[0]


def test_hook_names_map_to_the_block_whose_output_they_read(tmp_path):
    from mlxmerge.sae.evaluate import check_fits

    # TransformerLens: block i's input (hook_resid_pre) is block i-1's output (hook_resid_post).
    assert _with_hook(tmp_path, "blocks.3.hook_resid_post").hook_layer == 3
    assert _with_hook(tmp_path, "blocks.3.hook_resid_pre").hook_layer == 2
    for hook in ("blocks.0.hook_resid_pre", "blocks.3.hook_mlp_out", "blocks.3.attn.hook_z"):
        cfg = _with_hook(tmp_path, hook)
        assert cfg.hook_layer is None
        with pytest.raises(SAEError, match=f"reads '{re.escape(hook)}', not the residual"):
            check_fits(cfg, None, None)
