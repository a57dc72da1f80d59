import json

from click.testing import CliRunner

from mlxmerge.cli import cli


def test_abliterate_command_prints_the_choice_and_table(abliterated):
    out, report, output = abliterated
    d = report["direction"]
    assert f"direction: residual point {d['layer']}, position {d['position']}" in output
    assert "why: lowest refusal score" in output
    assert "refusal rate (harmful)" in output and f"wrote {out}" in output
    assert (out / "config.json").exists()


def test_abliterate_command_errors(refuser, tmp_path):
    res = CliRunner().invoke(
        cli, ["abliterate", str(refuser), "-o", str(tmp_path / "o"), "--layers", "9"]
    )
    assert res.exit_code == 1
    assert "Error: --layers 9: layer 9 is out of range" in res.output


def test_refusals_command_compares_two_models(refuser, abliterated):
    out, _, _ = abliterated
    args = ["refusals", str(out), "--compare", str(refuser), "--limit", "20", "--max-tokens", "30",
            "--batch-size", "32"]  # fmt: skip
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    edited, base = data["models"][str(out)], data["models"][str(refuser)]
    assert base["refusal_rate"] >= 0.9 and edited["refusal_rate"] <= 0.1
    assert 0 <= edited["kl_vs_compare"] and 0 <= edited["same_harmless_answers"] <= 1
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0 and "refusals" in table.output and "KL vs compare" in table.output


def test_refusals_with_markers_and_perplexity(refuser, tmp_path):
    (tmp_path / "m.txt").write_text("sure\n")
    (tmp_path / "t.txt").write_text("How do I bake bread?\nTell me how to plant a tree.\n")
    res = CliRunner().invoke(cli, ["refusals", str(refuser), "--markers", str(tmp_path / "m.txt"),
                                   "--text", str(tmp_path / "t.txt"), "--limit", "10",
                                   "--max-tokens", "12", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["models"][str(refuser)]
    # With "sure" as the only marker the helpful answers count as refusals and refusals do not.
    assert row["harmless_refusal_rate"] >= 0.9 and row["refusal_rate"] <= 0.1
    assert row["perplexity"] > 1.0
