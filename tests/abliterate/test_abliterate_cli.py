import json

from click.testing import CliRunner

from mlxmerge.cli import cli


def test_abliterate_command_prints_the_choice_and_table(abliterated):
    out, report, output = abliterated
    d = report["direction"]
    assert f"direction: residual point {d['layer']}, position {d['position']}" in output
    assert "why: lowest refusal score" in output
    assert "refusals (harmful, n=100)" in output and f"wrote {out}" in output
    assert "95% Wilson" in output and "  after  [" in output  # before/after sample answers
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
    assert edited["refusal"]["n"] == 20 and edited["refusal"]["k"] == round(
        20 * edited["refusal_rate"]
    )
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0 and "refusals" in table.output and "KL vs compare" in table.output


def test_refusals_answers_show_prompts_answers_and_verdicts(refuser):
    from mlxmerge.abliterate.prompts import bundled_prompts
    from mlxmerge.eval.refusal import is_refusal

    args = ["refusals", str(refuser), "--limit", "6", "--max-tokens", "12", "--answers", "3"]
    data = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)
    shown = data["models"][str(refuser)]["answers"]
    assert [x["prompt"] for x in shown["harmful"]] == bundled_prompts("harmful", "test")[:3]
    assert all(x["refusal"] == is_refusal(x["answer"]) for k in shown for x in shown[k])
    text = CliRunner().invoke(cli, args).output
    first = shown["harmful"][0]
    assert f"[{'REFUSAL' if first['refusal'] else 'answer'}] {first['prompt']}" in text


def test_abliterate_says_refusal_rate_and_plan_before_the_search(refuser, tmp_path):
    res = CliRunner().invoke(cli, ["abliterate", str(refuser), "-o", str(tmp_path / "o"),
                                   "--batch-size", "32", "--no-eval", "--top-candidates", "3",
                                   "--positions", "-1,-2", "--direction-layer", "1-2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    said = next(i for i, ln in enumerate(lines) if "of the harmful validation prompts" in ln)
    plan = next(i for i, ln in enumerate(lines) if ln.startswith("direction search:"))
    assert said < plan and "95% CI" in lines[said]
    # 2 layers × 2 positions = 4 candidates, the best 3 measured; the estimate is a duration.
    assert "4 candidates" in lines[plan] and "the best 3" in lines[plan] and "about " in lines[plan]
    report = json.loads((tmp_path / "o" / "abliteration.json").read_text())
    assert len(report["candidates"]) == 3 and len(report["screening"]) == 4
    assert {c["position"] for c in report["screening"]} == {-1, -2}


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


def test_a_template_name_is_refused_in_one_line(refuser, tmp_path):
    res = CliRunner().invoke(cli, ["refusals", str(refuser), "--template", "chatml"])
    assert res.exit_code == 2 and "neither a file nor a Jinja template" in res.output
    assert "Traceback" not in res.output
