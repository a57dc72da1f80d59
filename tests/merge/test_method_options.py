"""Method options explain themselves: one Param per parameter drives validation, --help and docs."""

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.errors import RecipeError
from mlxmerge.merge.params import KINDS
from mlxmerge.merge.registry import (
    METHODS,
    REQUIRED,
    check_params,
    parameters_markdown,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "merging-methods.md"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def test_every_parameter_declares_kind_meaning_and_a_default_of_its_kind():
    for name, spec in METHODS.items():
        assert list(spec.params) == list(spec.tensor_params) + list(spec.global_params), name
        for p, param in spec.params.items():
            assert param.kind in KINDS, (name, p)
            assert param.meaning.strip(), f"{name}.{p} has no meaning"
            assert "\n" not in param.meaning
            default = spec.tensor_params.get(p, spec.global_params.get(p))
            assert default is param.default
            if default not in (REQUIRED, None):
                assert param.accepts(default), (name, p, default)


def test_validation_follows_the_declared_range():
    # Independent of the table: a value just outside each declared bound is refused, inside kept.
    for name, spec in METHODS.items():
        for p, param in spec.params.items():
            if param.kind not in ("number", "int"):
                continue
            base = {k: 1 for k, v in spec.tensor_params.items() if v is REQUIRED and k != p}
            for bound, step in ((param.low, -0.5), (param.high, 0.5)):
                if bound is None:
                    continue
                check_params(name, {**base, p: bound}, "parameters", scope="global")
                with pytest.raises(RecipeError, match=f"'{p}' of {name} must be"):
                    check_params(name, {**base, p: bound + step}, "parameters", scope="global")


def test_a_gradient_is_refused_where_it_means_nothing():
    with pytest.raises(RecipeError, match="'normalize' of ties takes one value.*not a gradient"):
        check_params("ties", {"weight": 1, "normalize": [True, False]}, "parameters")
    with pytest.raises(RecipeError, match="'max_iter' of karcher takes one value"):
        check_params("karcher", {"max_iter": [{"filter": "mlp", "value": [1, 5]}]}, "p")
    check_params("ties", {"weight": 1, "normalize": [{"filter": "mlp", "value": False}]}, "p")
    check_params(
        "ties", {"weight": [0, 0.5, 1], "density": [{"filter": "mlp", "value": [0, 1]}]}, "p"
    )


def test_docs_parameter_tables_are_generated_from_the_table():
    text = DOC.read_text()
    inside = re.search(r"<!-- parameters:begin -->\n(.*)<!-- parameters:end -->", text, re.DOTALL)
    assert inside, "docs/merging-methods.md lost its parameter tables"
    assert inside.group(1) == parameters_markdown(), (
        "regenerate the tables: python -c 'from mlxmerge.merge.registry import "
        "parameters_markdown as p; print(p())'"
    )
    # and every parameter of every method is listed under that method's heading
    sections = dict(
        re.findall(r"### `(\w+)`[^\n]*\n(.*?)(?=\n### |\Z)", inside.group(1), re.DOTALL)
    )
    for name, spec in METHODS.items():
        for p in spec.params:
            assert f"| `{p}` |" in sections[name], (name, p)


@pytest.mark.parametrize("name", sorted(m for m in METHODS if m != "passthrough"))
def test_method_help_gives_meaning_range_default_and_gradient_only_for_numbers(name):
    spec = METHODS[name]
    r = run(name.replace("_", "-"), "--help")
    assert r.exit_code == 0, r.output
    out = flat(r.output)
    numbers = [p for p, param in spec.params.items() if param.gradient]
    assert out.count("Gradient: 0,0.5,1.") == len(numbers)
    assert ("--seed" in out) == spec.random
    command = cli.commands[name.replace("_", "-")]
    for opt in command.params:
        key = opt.name.removesuffix("_opt")
        if key not in spec.params:
            continue
        param = spec.params[key]
        assert opt.help.startswith(f"mergekit `{key}`: {param.meaning}")
        assert param.range_text().lower() in opt.help.lower()
        assert ("required" if param.default is REQUIRED else param.default_text()) in opt.help
        assert ("Gradient:" in opt.help) == (param.kind == "number")
    base_help = next(o.help for o in command.params if o.name == "base")
    assert ("task vectors (model − base) are taken from it" in base_help) == (
        spec.base == "required" and spec.max_models != 1
    )


def test_slerp_help_says_the_first_model_is_the_base():
    out = flat(run("slerp", "--help").output)
    assert "Without --base the first of the two MODELS is the base" in out
    assert "has no base (no task vectors)" in flat(run("linear", "--help").output)


def test_model_count_and_weight_count_errors_name_the_real_problem(family):
    a, b, base = family["model_a"], family["model_b"], family["base"]
    r = run("slerp", a, b, base, "--t", "0.5", "--dry-run")
    assert r.exit_code == 1
    assert "slerp merges exactly two models" in r.output and "got 3" in r.output
    assert "needs --base" not in r.output
    r = run("linear", a, b, base, "--weight", "0.5", "--weight", "0.3", "--dry-run")
    assert r.exit_code == 1
    assert "--weight: got 2 values for 3 models" in r.output
    assert "unfiltered" not in r.output
    r = run("slerp", a, b, "--t", "0.2", "--t", "0.4", "--dry-run")
    assert r.exit_code == 1 and "--t is one value for all models, got 2" in r.output
    r = run("ties", a, b, "--weight", "1", "--dry-run")
    assert r.exit_code == 1 and "ties needs --base BASE" in r.output
    r = run("linear", a, b, base, "--weight", "1", "--weight", "2", "--weight", "1", "--dry-run")
    assert r.exit_code == 0, r.output


# Every method name mergekit 0.1.5 registers (mergekit/merge_methods/registry.py).
MERGEKIT_0_1_5_METHODS = (
    "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
    "della_linear", "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp",
    "passthrough", "ram", "ramplus_tl", "sce", "slerp", "task_arithmetic", "ties",
)  # fmt: skip


def test_every_mergekit_method_name_runs_as_a_recipe_method_and_a_command():
    assert set(MERGEKIT_0_1_5_METHODS) <= set(METHODS)
    commands = set(cli.list_commands(None))
    for method in MERGEKIT_0_1_5_METHODS:
        if method != "passthrough":  # passthrough is `frankenmerge` on the command line
            assert method.replace("_", "-") in commands, method


def test_model_card_names_the_project_without_a_made_up_url(family, tmp_path):
    out = tmp_path / "m"
    r = run("linear", family["model_a"], family["model_b"], "--weight", "1", "-o", out)
    assert r.exit_code == 0, r.output
    card = (out / "README.md").read_text()
    assert "mlxmerge" in card
    links = re.findall(r"https?://\S+", card)
    assert links and all("mlxmerge" not in u for u in links)  # only the paper link remains


def test_recipe_path_names_the_real_problem_too(family, tmp_path):
    a, b, base = (str(family[k]) for k in ("model_a", "model_b", "base"))
    recipe = tmp_path / "slerp3.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "slerp",
                "parameters": {"t": 0.5},
                "models": [{"model": m} for m in (a, b, base)],
            }
        )
    )
    r = run("merge", recipe, "--dry-run")
    assert r.exit_code == 1
    assert "slerp merges exactly two models, base_model and one other" in r.output
    assert "task vectors" not in r.output
    r = run("slerp", a, b, "--t", "self_attn=0,1", "--t", "0.5", "--t", "0.3", "--dry-run")
    assert r.exit_code == 1
    assert "--t: with filters (NAME=VALUE), give at most one value without a filter" in r.output


def test_dare_help_comes_from_the_table():
    out = flat(run("dare", "--help").output)
    param = METHODS["dare_ties"].params["density"]
    assert f"mergekit `density`: {param.meaning}" in out and "--seed" in out
    assert "--seed" not in flat(run("frankenmerge", "--help").output)
