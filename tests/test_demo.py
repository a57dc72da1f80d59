"""``mlxmerge demo`` end to end: the embedded default job a user runs first."""

import json

from click.testing import CliRunner

from mlxmerge.cli import cli


def test_demo_runs_offline_and_every_output_loads(tmp_path):
    import mlx_lm

    from mlxmerge.sae.saelens import load_sae

    r = CliRunner().invoke(cli, ["demo", "-o", str(tmp_path / "demo"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    before, after = report["abliteration"]["refusal rate on held-out harmful prompts"].split(" -> ")
    assert int(before.rstrip("%")) >= 90 and int(after.rstrip("%")) <= 10
    assert float(report["abliteration"]["first-token KL on harmless prompts"]) <= 0.1
    merged = report["merge"]["output"]
    model, _tok = mlx_lm.load(merged)
    assert len(model.layers) == 4
    answers = [v for k, v in report["merge"].items() if k.startswith("mlx_lm.generate")]
    assert len(answers) == 2 and all(a.strip() for a in answers)
    cfg, params = load_sae(report["sae"]["output (SAELens format)"])
    assert cfg.d_in == 64 and params["W_dec"].shape == (cfg.d_sae, 64)
    assert report["sae"]["l0"] <= 8 and 0 <= report["sae"]["fvu"] < 0.5
