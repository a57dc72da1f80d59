"""extract-lora: a rank-4 change comes back exactly, through mlx-lm's own adapter loading."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from lora_helpers import RANK, load_weights, low_rank_change
from safetensors import safe_open

from mlxmerge.cli import cli
from mlxmerge.demo.tiny import save_weights
from mlxmerge.errors import MlxmergeError
from mlxmerge.lora import extract_lora
from mlxmerge.lora.svd import choose_rank, economy_svd, low_rank, randomized_svd

TOKENS = mx.array([[1, 17, 42, 99, 7, 250, 3, 64, 128, 5]])


def logits(model_path, adapter=None):
    from mlx_lm import load

    model, _ = load(str(model_path), adapter_path=str(adapter) if adapter else None)
    return np.array(model(TOKENS).astype(mx.float32))


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_economy_svd_against_numpy(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    u, s, vt = (np.array(t) for t in economy_svd(mx.array(x)))
    k = min(shape)
    assert u.shape == (shape[0], k) and vt.shape == (k, shape[1])
    np.testing.assert_allclose(s, np.linalg.svd(x, compute_uv=False), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose((u * s) @ vt, x, atol=1e-4)
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-4)


def test_randomized_svd_finds_the_top_of_a_decaying_spectrum():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((96, 40)) * np.exp(-np.arange(40) / 4)) @ rng.standard_normal(
        (40, 160)
    )
    x = (x + 1e-3 * rng.standard_normal((96, 160))).astype(np.float32)
    u, s, vt = (np.array(t) for t in randomized_svd(mx.array(x), 16))
    ref_u, ref_s, ref_vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(s[:8], ref_s[:8], rtol=1e-4)
    best = (ref_u[:, :8] * ref_s[:8]) @ ref_vt[:8]  # Eckart–Young: the best rank-8 approximation
    np.testing.assert_allclose((u[:, :8] * s[:8]) @ vt[:8], best, atol=1e-3 * ref_s[0])
    exact, rand = (low_rank(mx.array(x), rank=8, method=m) for m in ("exact", "randomized"))
    assert abs(exact.total - float((x.astype(np.float64) ** 2).sum())) < 1e-4 * exact.total
    np.testing.assert_allclose(
        np.array(rand.b @ rand.a), np.array(exact.b @ exact.a), atol=1e-3 * ref_s[0]
    )
    with pytest.raises(MlxmergeError, match="randomized SVD needs --rank or --max-rank"):
        low_rank(mx.array(x), energy=0.9, method="randomized")


def test_energy_picks_the_smallest_rank_reaching_the_share():
    s = mx.array([3.0, 2.0, 1.0, 0.5])  # squared: 9, 4, 1, 0.25 of 14.25
    cumulative = np.cumsum(np.array([9, 4, 1, 0.25])) / 14.25
    for energy in (0.5, 0.9, 0.95, 0.99, 1.0):
        assert choose_rank(s, energy=energy) == 1 + int(np.sum(cumulative < energy - 1e-7))
    assert choose_rank(s, energy=0.99, max_rank=2) == 2
    assert choose_rank(s, rank=9) == 4


def test_rank_4_reproduces_the_fine_tune_through_mlx_lm(lowrank, tmp_path):
    out = tmp_path / "adapter"
    report = extract_lora(lowrank["ft"], lowrank["base"], out, rank=RANK)
    assert report["not_covered"] == [] and len(report["modules"]) == 7 * 4
    for row in report["modules"]:
        assert row["rank"] == RANK and row["energy"] > 0.9999
    base, ft, adapted = logits(lowrank["base"]), logits(lowrank["ft"]), logits(lowrank["base"], out)
    change = np.linalg.norm(ft - base)
    assert change > 1.0  # the fine-tune really changes the logits
    assert 1 - np.linalg.norm(adapted - ft) / change >= 0.99
    # Rank 1 keeps only the top singular value of each change: measurably worse.
    report1 = extract_lora(lowrank["ft"], lowrank["base"], tmp_path / "r1", rank=1)
    assert all(abs(r["energy"] - 1 / (1 + 0.36 + 0.1225 + 0.04)) < 1e-3 for r in report1["modules"])
    assert 1 - np.linalg.norm(logits(lowrank["base"], tmp_path / "r1") - ft) / change < 0.99


def test_mlx_adapter_layout(lowrank, tmp_path):
    extract_lora(
        lowrank["ft"],
        lowrank["base"],
        tmp_path / "a",
        rank=RANK,
        modules=["q_proj", "mlp.down_proj"],
    )
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 4
    assert config["lora_parameters"] == {"rank": RANK, "scale": 1.0, "dropout": 0.0,
                                         "keys": ["mlp.down_proj", "self_attn.q_proj"]}  # fmt: skip
    w = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    assert len(w) == 2 * 2 * 4
    a, b = w["model.layers.2.mlp.down_proj.lora_a"], w["model.layers.2.mlp.down_proj.lora_b"]
    assert a.shape == (128, RANK) and b.shape == (RANK, 64)  # (in, r), (r, out)
    delta = lowrank["deltas"]["model.layers.2.mlp.down_proj.weight"]
    assert mx.allclose((a @ b).T, delta, atol=1e-5)  # mlx-lm: ΔW = scale · (A B)ᵀ, scale 1


def test_energy_ranks_are_padded_for_mlx_and_patterned_for_peft(lowrank, tmp_path):
    # Every change has s² ∝ (1, .36, .1225, .04): the rank reaching 90% follows from that alone.
    shares = np.cumsum([1, 0.36, 0.1225, 0.04]) / 1.5225
    want = 1 + int(np.sum(shares < 0.9))
    rep = extract_lora(lowrank["ft"], lowrank["base"], tmp_path / "m", energy=0.9)
    assert {r["rank"] for r in rep["modules"]} == {want}
    rep = extract_lora(lowrank["ft"], lowrank["base"], tmp_path / "p", energy=0.999, max_rank=3,
                       format="peft")  # fmt: skip
    assert {r["rank"] for r in rep["modules"]} == {3}


def test_ranks_capped_by_small_layers_are_zero_padded_for_mlx_lm(lowrank, tmp_path):
    # k_proj/v_proj have 32 outputs: rank 40 is capped at 32 there, 40 elsewhere.
    rep = extract_lora(lowrank["ft"], lowrank["base"], tmp_path / "a", rank=40)
    ranks = {r["module"].rsplit(".", 1)[-1]: r["rank"] for r in rep["modules"]}
    assert ranks["k_proj"] == ranks["v_proj"] == 32 and ranks["q_proj"] == 40
    w = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    assert w["model.layers.0.self_attn.k_proj.lora_a"].shape == (64, 40)
    assert not mx.any(w["model.layers.0.self_attn.k_proj.lora_b"][32:]).item()  # the padding
    ft, adapted = logits(lowrank["ft"]), logits(lowrank["base"], tmp_path / "a")
    assert np.linalg.norm(adapted - ft) < 1e-3 * np.linalg.norm(ft - logits(lowrank["base"]))


def test_peft_layout_field_by_field(lowrank, tmp_path):
    extract_lora(
        lowrank["ft"], lowrank["base"], tmp_path / "p", rank=RANK, format="peft", modules=["v_proj"]
    )
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == RANK and config["lora_alpha"] == RANK  # scale lora_alpha / r = 1
    assert config["target_modules"] == ["v_proj"] and config["base_model_name_or_path"] == str(
        lowrank["base"]
    )
    assert config["rank_pattern"] == {} and not config["use_rslora"] and not config["use_dora"]
    with safe_open(str(tmp_path / "p" / "adapter_model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        assert keys == {f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_{p}.weight"
                        for i in range(4) for p in "AB"}  # fmt: skip
        for i in range(4):
            pre = f"base_model.model.model.layers.{i}.self_attn.v_proj"
            a, b = f.get_tensor(f"{pre}.lora_A.weight"), f.get_tensor(f"{pre}.lora_B.weight")
            assert a.shape == (RANK, 64) and b.shape == (32, RANK)  # (r, in), (out, r)
            delta = np.array(lowrank["deltas"][f"model.layers.{i}.self_attn.v_proj.weight"])
            np.testing.assert_allclose(b @ a, delta, atol=1e-5)  # PEFT: ΔW = (alpha/r) · B A
        assert f.metadata()["format"] == "pt"


def test_changed_embeddings_are_reported_or_saved_whole(lowrank, tmp_path):
    weights = load_weights(lowrank["ft"])
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 1.1
    weights["model.norm.weight"] = weights["model.norm.weight"] + 0.5
    ft = save_weights(tmp_path / "ft", weights, lowrank["config"], lowrank["tokenizer"])
    rep = extract_lora(ft, lowrank["base"], tmp_path / "m", rank=2)
    assert {r["tensor"]: r["written"] for r in rep["not_covered"]} == {
        "model.embed_tokens.weight": None, "model.norm.weight": None}  # fmt: skip
    assert abs(rep["not_covered"][0]["rel_delta"] - 0.1) < 1e-5
    rep = extract_lora(ft, lowrank["base"], tmp_path / "p", rank=2, format="peft")
    assert rep["not_covered"][0]["written"] == "modules_to_save"
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens"]
    saved = mx.load(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert mx.array_equal(
        saved["base_model.model.model.embed_tokens.weight"], weights["model.embed_tokens.weight"]
    )


def test_cli_extract_lora_and_errors(lowrank, family, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["extract-lora", str(lowrank["ft"]), "--base", str(lowrank["base"]), "--rank", "4",
                              "-o", str(tmp_path / "a"), "--modules", "q_proj,k_proj", "--plot", str(tmp_path / "e.png")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "self_attn.q_proj" in res.output and "≥100.0%" in res.output
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    ft, base, x = lowrank["ft"], lowrank["base"], tmp_path / "x"
    with pytest.raises(MlxmergeError, match="exactly one of --rank"):
        extract_lora(ft, base, x, rank=4, energy=0.9)
    with pytest.raises(MlxmergeError, match=r"\(0, 1\]"):
        extract_lora(ft, base, x, energy=1.5)
    with pytest.raises(MlxmergeError, match="--modules qproj: matches no linear layer"):
        extract_lora(ft, base, x, rank=2, modules=["qproj"])
    with pytest.raises(MlxmergeError, match="randomized needs --rank or --max-rank"):
        extract_lora(ft, base, x, energy=0.5, svd="randomized")
    with pytest.raises(MlxmergeError, match="unknown adapter format 'gguf'"):
        extract_lora(ft, base, x, rank=2, format="gguf")
    with pytest.raises(MlxmergeError, match="intermediate|share an architecture"):
        extract_lora(family["wide"], lowrank["base"], tmp_path / "x", rank=2)
    with pytest.raises(MlxmergeError, match="identical in every linear layer: nothing to extract"):
        extract_lora(base, base, x, rank=2)  # the same model twice: an all-zero adapter
    assert not (tmp_path / "x").exists()


def test_delta_helper_is_rank_4():
    w = mx.random.normal((32, 48), key=mx.random.key(0))
    s = np.linalg.svd(np.array(low_rank_change(w, RANK, mx.random.key(1))), compute_uv=False)
    assert s[RANK - 1] > 1e-3 and s[RANK] < 1e-5 * s[0]


def test_a_non_finite_fine_tune_is_named_before_any_svd(lowrank, tmp_path):
    """Issue 15: extract-lora stops on NaN/Inf in an input, naming model and tensor."""
    from mlxmerge.errors import NonFiniteError

    tuned = load_weights(lowrank["ft"])
    name = "model.layers.1.mlp.up_proj.weight"
    x = np.array(tuned[name])
    x[0, 0], x[1, 1] = np.nan, np.inf
    tuned[name] = mx.array(x)
    bad = save_weights(tmp_path / "bad", tuned, lowrank["config"], lowrank["tokenizer"],
                       title="bad")  # fmt: skip
    with pytest.raises(NonFiniteError, match=rf"bad: tensor {name} holds 1 NaN and 1 Inf"):
        extract_lora(str(bad), str(lowrank["base"]), tmp_path / "a", rank=4)
    assert not (tmp_path / "a").exists()
    r = CliRunner().invoke(cli, ["extract-lora", str(bad), "--base", str(lowrank["base"]),
                                 "--rank", "4", "-o", str(tmp_path / "b")])  # fmt: skip
    assert r.exit_code != 0 and "1 NaN and 1 Inf" in r.output and "Traceback" not in r.output
    assert "--allow-nonfinite" not in r.output  # extract-lora has no such option
    assert not (tmp_path / "b").exists()
