"""Train / eval / features / steer end to end on the tiny model, through the API and the CLI."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.sae import evaluate_sae, feature_report, load_sae, quick_sae, save_sae, steer, train
from mlxmerge.sae.model import SAEConfig, SAEError


def test_trained_sae_folder(trained_sae):
    folder, summary = trained_sae
    cfg, _ = load_sae(folder)
    assert (cfg.d_in, cfg.d_sae, cfg.k, cfg.hook_layer) == (64, 256, 8, 2)
    assert summary["eval_l0"] <= 8 and summary["eval_fvu"] < 0.8
    history = json.loads((folder / "history.json").read_text())
    assert history[-1]["step"] == 60 and history[-1]["l0"] <= 8
    assert (folder / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "sparsity.safetensors").is_file()
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["model_name"].endswith("model") and meta["context_size"] == 64


def _identity_sae(tmp_path, d=64, layer=2):
    """relu(x) - relu(-x) = x: a 2d-latent ReLU SAE that reconstructs exactly."""
    eye = mx.eye(d)
    params = {"encoder": mx.concatenate([eye, -eye]), "b_enc": mx.zeros((2 * d,)),
              "W_dec": mx.concatenate([eye, -eye]), "b_dec": mx.zeros((d,))}  # fmt: skip
    cfg = SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", hook_layer=layer)
    return save_sae(tmp_path / "identity", cfg, params)


def test_eval_perfect_sae_recovers_all_loss(tmp_path, tiny_model, text_file):
    r = evaluate_sae(_identity_sae(tmp_path), tiny_model, text_file, tokens=600, context_size=64)
    assert r["fvu"] < 1e-10 and r["kl"] < 1e-6
    assert r["ce_sae"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert r["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert r["kl_zero"] > 0 and r["ce_zero"] != r["ce_clean"]


def test_eval_numbers_are_consistent(trained_sae, tiny_model, text_file):
    r = evaluate_sae(trained_sae[0], tiny_model, text_file, tokens=600, context_size=64)
    expected = (r["ce_zero"] - r["ce_sae"]) / (r["ce_zero"] - r["ce_clean"])
    assert r["loss_recovered"] == pytest.approx(expected)
    assert r["explained_variance"] == pytest.approx(1 - r["fvu"])
    assert 0 < r["l0"] <= 8 and r["kl"] >= 0 and "sum_n" in r["fvu_formula"]


def test_eval_rejects_an_sae_of_another_width(tmp_path, tiny_model, text_file):
    cfg = SAEConfig(d_in=32, d_sae=64, k=4, hook_layer=1)
    from mlxmerge.sae.model import init_params

    save_sae(tmp_path / "narrow", cfg, init_params(cfg))
    with pytest.raises(SAEError, match="d_in=32 but the model's residual stream is 64 wide"):
        evaluate_sae(tmp_path / "narrow", tiny_model, text_file, tokens=100)
    with pytest.raises(SAEError, match="layer 9 does not exist"):
        evaluate_sae(trained_sae_path := tmp_path / "narrow", tiny_model, text_file, layer=9)  # noqa: F841


def test_train_errors(tmp_path, acts_dir, tiny_model, text_file):
    with pytest.raises(SAEError, match="k=300 is larger than d_sae=256"):
        train(tmp_path / "x", acts=acts_dir, layer=0, k=300, expansion=4, tokens=1000)
    with pytest.raises(SAEError, match="give either --acts"):
        train(tmp_path / "x", tokens=1000)
    with pytest.raises(SAEError, match="layer 5 does not exist"):
        train(tmp_path / "x", model=tiny_model, layer=5, data=text_file, tokens=1000)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", ["batchtopk", "relu"])
def test_other_architectures_train_on_the_fly(tmp_path, tiny_model, text_file, arch):
    r = train(tmp_path / arch, model=tiny_model, layer=1, data=text_file, k=8, expansion=2,
              architecture=arch, tokens=256 * 30, batch_size=256, collect_tokens=1500, lr=1e-3,
              context_size=64)  # fmt: skip
    cfg, params = load_sae(tmp_path / arch)
    assert cfg.architecture == {"batchtopk": "jumprelu", "relu": "relu"}[arch]
    # on training batches; the held-out FVU of 30 relu steps on 1,500 tokens can exceed 1
    assert r["fvu"] < 1.0 and np.isfinite(r["eval_fvu"]) and r["eval_tokens"] > 0
    if arch == "batchtopk":
        t = np.array(params["threshold"])
        assert (t > 0).all() and np.ptp(t) == 0  # one EMA threshold, as SAELens exports it


def test_steer_scale_zero_equals_plain_generation(trained_sae, tiny_model):
    r = steer(trained_sae[0], tiny_model, "one two three", feature=3, scale=0.0, max_tokens=8)
    assert r["steered"] == r["plain"]
    big = steer(trained_sae[0], tiny_model, "one two three", feature=3, scale=200.0, max_tokens=8)
    assert big["plain"] == r["plain"]
    with pytest.raises(SAEError, match="exactly one of"):
        steer(trained_sae[0], tiny_model, "x", feature=3, scale=1.0, ablate=True)
    with pytest.raises(SAEError, match="feature 999 does not exist"):
        steer(trained_sae[0], tiny_model, "x", feature=999, scale=1.0)


def test_clamp_pins_the_feature(trained_sae, tiny_model):
    from mlxmerge.sae.model import encode
    from mlxmerge.sae.steer import steering_edit

    cfg, params = load_sae(trained_sae[0])
    h = mx.random.normal((1, 5, 64), key=mx.random.key(0)) * 3
    f = int(np.argmax(np.array(encode(params, cfg, h))[0, 0]))
    edited = steering_edit(params, cfg, f, clamp=0.0)(h)
    z = np.array(encode(params, cfg, edited))
    assert np.abs(z[..., f]).max() < 1e-3


def test_feature_report(trained_sae, tiny_model, text_file, tmp_path):
    rep = feature_report(trained_sae[0], tiny_model, text_file, tmp_path / "rep", n_features=4,
                         tokens=800, context_size=64)  # fmt: skip
    # by density band (frequent, medium, rare), each band's latents in falling density, dense apart
    order = ["frequent", "medium", "rare", "dense"]
    ranks = [(order.index(f["band"]), -f["density"]) for f in rep["features"]]
    assert ranks == sorted(ranks) and 0 < len([r for r in ranks if r[0] < 3]) <= 4
    for f in rep["features"]:
        d = f["density"]
        assert f["band"] == ("dense" if d > 0.1 else "frequent" if d > 0.01 else
                             "medium" if d > 1e-3 else "rare")  # fmt: skip
    for f in rep["features"]:
        acts = [c["activation"] for c in f["top_contexts"]]
        assert acts == sorted(acts, reverse=True) and acts[0] == pytest.approx(f["max_activation"])
        c = f["top_contexts"][0]
        assert c["values"][c["focus"]] == pytest.approx(c["activation"])
        assert len(f["promoted_tokens"]) == 10
    html = (tmp_path / "rep" / "index.html").read_text()
    assert f"Feature {rep['features'][0]['index']}" in html
    assert json.loads((tmp_path / "rep" / "features.json").read_text()) == json.loads(
        json.dumps(rep)
    )


def test_quick_sae(tmp_path, tiny_model):
    r = quick_sae(tiny_model, 1, tmp_path / "quick", tokens=1024, steps=20)
    assert load_sae(tmp_path / "quick")[0].hook_layer == 1
    assert r["eval_l0"] <= 8 and r["out"] == str(tmp_path / "quick")


def test_cli_end_to_end(tmp_path, tiny_model, text_file, trained_sae):
    run = CliRunner().invoke
    r = run(cli, ["sae", "collect", str(tiny_model), "--layer", "1", "--data", str(text_file),
                  "--tokens", "1K", "-o", str(tmp_path / "acts"), "--context-size", "64"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "1000 tokens" in r.output
    r = run(cli, ["-q", "sae", "train", "--acts", str(tmp_path / "acts"), "-o", str(tmp_path / "s"),
                  "--k", "4", "--expansion", "2", "--tokens", "2560", "--batch-size", "256"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "eval_fvu" in r.output
    r = run(cli, ["sae", "eval", str(trained_sae[0]), str(tiny_model), "--data", str(text_file),
                  "--tokens", "300", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "loss_recovered" in json.loads(r.stdout)
    r = run(cli, ["sae", "features", str(trained_sae[0]), str(tiny_model), "--data", str(text_file),
                  "-o", str(tmp_path / "rep"), "--feature", "1", "--feature", "2", "--tokens", "300"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run(cli, ["sae", "steer", str(trained_sae[0]), str(tiny_model), "--feature", "1",
                  "--scale", "0", "--prompt", "one two", "--max-tokens", "4"])  # fmt: skip
    assert r.exit_code == 0, r.output
    plain, steered = r.output.split("--- steered")
    assert plain.split("\n", 1)[1].strip() == steered.split("\n", 1)[1].strip()
    r = run(cli, ["sae", "train", "--acts", str(tmp_path / "acts"), "-o", str(tmp_path / "t"),
                  "--k", "999", "--expansion", "2"])  # fmt: skip
    assert r.exit_code == 1 and "Error: k=999 is larger than d_sae=128" in r.output
