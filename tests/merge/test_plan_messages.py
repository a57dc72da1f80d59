"""Planning errors name the real problem: each architecture's own config fields, the flag to set."""

import pytest
from archs import build_arch, build_arch_tokenizer

from mlxmerge.errors import RecipeError
from mlxmerge.merge.plan import plan_merge


@pytest.fixture(scope="module")
def llama_and_gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_messages")
    tok = build_arch_tokenizer(root / "tok")
    llama = build_arch("llama", root / "llama", tok)
    tuned = build_arch("llama", root / "llama_ft", tok, perturb=0.01)
    return llama, build_arch("gpt2", root / "gpt2", tok), tuned


def test_different_architectures_show_gpt2s_own_width(llama_and_gpt2):
    import json

    llama, gpt2, _ = llama_and_gpt2
    width = json.loads((gpt2 / "config.json").read_text())["n_embd"]
    recipe = {"merge_method": "linear", "models": [
        {"model": str(llama), "parameters": {"weight": 0.5}},
        {"model": str(gpt2), "parameters": {"weight": 0.5}}]}  # fmt: skip
    with pytest.raises(RecipeError, match="different architectures") as err:
        plan_merge(recipe)
    assert "None" not in str(err.value)  # fields GPT-2 lacks say so; its n_embd is its width
    assert "model_type llama vs gpt2" in str(err.value)
    if "hidden_size" in str(err.value):
        assert f"vs {width}" in str(err.value)


def test_a_missing_required_parameter_names_the_flag(llama_and_gpt2):
    llama, _, tuned = llama_and_gpt2
    recipe = {"merge_method": "della", "base_model": str(llama),
              "models": [{"model": str(tuned), "parameters": {"density": 0.5}}]}  # fmt: skip
    with pytest.raises(RecipeError, match=r"'weight' is required.*--weight"):
        plan_merge(recipe)


def test_merge_cli_refuses_two_outputs_and_group_size_without_quantize(llama_and_gpt2, tmp_path):
    import yaml
    from click.testing import CliRunner

    from mlxmerge.cli import cli

    llama, _, tuned = llama_and_gpt2
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(llama), "parameters": {"weight": 0.5}},
        {"model": str(tuned), "parameters": {"weight": 0.5}}]}))  # fmt: skip
    run = CliRunner().invoke
    r = run(cli, ["merge", str(recipe), str(tmp_path / "a"), "-o", str(tmp_path / "b")])
    assert r.exit_code != 0 and "two output folders" in r.output
    r = run(cli, ["merge", str(recipe), "-o", str(tmp_path / "c"), "--group-size", "32"])
    assert r.exit_code != 0 and "--quantize" in r.output
    assert not any((tmp_path / d).exists() for d in "abc")
    r = run(cli, ["merge", str(recipe), "-o", str(tmp_path / "d"), "--quantize", "4",
                  "--group-size", "32"])  # fmt: skip
    assert r.exit_code == 0, r.output
    import json

    assert (
        json.loads((tmp_path / "d" / "config.json").read_text())["quantization"]["group_size"] == 32
    )
