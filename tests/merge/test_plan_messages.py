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
