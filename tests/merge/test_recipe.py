"""Recipe parsing and mergekit's parameter resolution (gradients, filters, precedence)."""

import numpy as np
import pytest

from mlxmerge.errors import RecipeError
from mlxmerge.merge.recipe import (
    Slice,
    Source,
    TokenSource,
    evaluate_setting,
    parse_recipe,
    resolve_parameter,
)


def test_gradient_interpolates_piecewise_linearly():
    anchors = [0.0, 0.5, 0.3, 0.7, 1.0]
    ts = np.linspace(0, 1, 13)
    got = [evaluate_setting(anchors, "model.layers.0.mlp.up_proj.weight", t) for t in ts]
    assert got == pytest.approx(np.interp(ts, np.linspace(0, 1, len(anchors)), anchors))


def test_filters_first_match_wins_and_catch_all():
    setting = [
        {"filter": "self_attn", "value": [0, 1]},
        {"filter": "mlp", "value": 0.25},
        {"value": 0.5},
    ]
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 1.0) == 1.0
    assert evaluate_setting(setting, "model.layers.3.mlp.down_proj.weight", 0.9) == 0.25
    assert evaluate_setting(setting, "model.norm.weight", 0.0) == 0.5
    assert evaluate_setting(setting[:2], "model.norm.weight", 0.0) is None


def test_precedence_source_over_slice_over_top_level():
    raw = {
        "merge_method": "ties",
        "base_model": "b",
        "parameters": {"density": 0.1, "weight": 0.3},
        "slices": [
            {
                "sources": [
                    {"model": "a", "layer_range": [0, 4], "parameters": {"weight": 0.9}},
                    {"model": "b", "layer_range": [0, 4]},
                ],
                "parameters": {"density": 0.7},
            }
        ],
    }
    r = parse_recipe(raw)
    sl = r.slices[0]
    a, b = sl.sources
    name = "model.layers.0.mlp.up_proj.weight"
    assert resolve_parameter("weight", name, 0, source=a, slice_=sl, recipe=r) == 0.9
    assert resolve_parameter("weight", name, 0, source=b, slice_=sl, recipe=r) == 0.3
    assert resolve_parameter("density", name, 0, source=a, slice_=sl, recipe=r) == 0.7
    assert resolve_parameter("gamma", name, 0, source=a, slice_=sl, recipe=r) is None


def test_models_form_adds_missing_base():
    r = parse_recipe(
        {"merge_method": "ties", "base_model": "base", "models": ["a", {"model": "b"}]}
    )
    assert [s.model for s in r.slices[0].sources] == ["a", "b", "base"]
    assert r.models == ["base", "a", "b"]


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"models": ["a"]}, "merge_method is missing"),
        ({"merge_method": "linear"}, "exactly one of models or slices"),
        (
            {"merge_method": "linear", "models": ["a"], "slices": []},
            "exactly one of models or slices",
        ),
        (
            {
                "merge_method": "linear",
                "models": ["a"],
                "tokenizer_source": "union",
                "tokenizer": {"source": "union"},
            },
            "tokenizer_source or a tokenizer block",
        ),
        (
            {
                "merge_method": "linear",
                "models": ["a"],
                "tokenizer": {"tokens": {"x": {"force": 1}}},
            },
            r"tokens\['x'\].force",
        ),
        (
            {"merge_method": "linear", "models": ["a"], "tokenizer": {"sorce": "union"}},
            "unknown key 'sorce'.*did you mean 'source'",
        ),
        ({"merge_method": "linear", "models": ["a"], "chat_template": "chatmll"}, "chat_template"),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "a", "layer_range": [4, 2]}]}],
            },
            "layer_range",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a", "weight": 1}]},
            "unknown key 'weight'",
        ),
    ],
)
def test_bad_recipes_are_clear_errors(raw, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(raw)


def test_yaml_file_errors_name_the_file(tmp_path):
    p = tmp_path / "r.yml"
    p.write_text("merge_method: [unclosed\n")
    with pytest.raises(RecipeError, match="r.yml: not valid YAML"):
        parse_recipe(p)
    with pytest.raises(RecipeError, match="nope.yml: recipe not found"):
        parse_recipe(tmp_path / "nope.yml")
    # A tab in the indentation (a common paste accident): the error says where.
    p.write_text("merge_method: linear\nmodels:\n  - model: a\n\t- model: b\n")
    with pytest.raises(RecipeError, match=r"r.yml: not valid YAML at line 4, column 1: .*'\\t'"):
        parse_recipe(p)


def test_source_and_slice_types():
    r = parse_recipe(
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}],
        }
    )
    assert r.slices == [Slice([Source("a", (0, 2), {})], {})]


def test_unknown_top_level_keys_warn_with_a_suggestion(caplog):
    """YAML anchor holders (``const_tag: &x 0.7``) are common on model cards; mergekit ignores them."""
    text = "const_tag: &w 0.7\nmerge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: *w}\nparamters: {}\n"
    r = parse_recipe_text(text)
    assert r.slices[0].sources[0].parameters == {"weight": 0.7}
    assert any("'const_tag'" in w for w in r.warnings)
    assert any("'paramters'" in w and "did you mean 'parameters'" in w for w in r.warnings)
    with pytest.raises(RecipeError, match="merge_method is missing"):
        parse_recipe({"models": ["a"], "const_tag": 1})


def parse_recipe_text(text, tmp=None):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.yml"
        p.write_text(text)
        return parse_recipe(p)


def test_empty_last_slice_is_accepted():
    r = parse_recipe(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "a", "layer_range": [0, 4]}]},
                {"sources": [{"model": "b", "layer_range": [4, 4]}]},
            ],
        }
    )
    assert r.slices[1].sources[0].layer_range == (4, 4)


def test_tokenizer_block_is_read():
    r = parse_recipe(
        {
            "merge_method": "linear",
            "models": ["a", "b"],
            "tokenizer": {
                "source": "union",
                "pad_to_multiple_of": 8,
                "tokens": {
                    "<x>": {"source": "b", "force": True},
                    "<y>": {"source": {"kind": "model_token", "model": "a", "token": "<z>"}},
                    "<w>": {"source": {"kind": "zero"}},
                },
            },
        }
    )
    t = r.tokenizer
    assert (t.source, t.pad_to_multiple_of) == ("union", 8)
    assert t.tokens["<x>"] == TokenSource("model", "b", force=True)
    assert t.tokens["<y>"] == TokenSource("model_token", "a", "<z>")
    assert t.tokens["<w>"].kind == "zero"
    assert (
        parse_recipe(
            {"merge_method": "linear", "models": ["a"], "tokenizer_source": "union"}
        ).tokenizer.source
        == "union"
    )


def test_several_documents_need_the_multi_runner(tmp_path):
    p = tmp_path / "multi.yml"
    p.write_text(
        "name: x\nmerge_method: linear\nmodels: [a]\n---\nmerge_method: linear\nmodels: [x]\n"
    )
    with pytest.raises(RecipeError, match="2 YAML documents"):
        parse_recipe(p)


def test_yaml_11_exponent_strings_are_numbers():
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; mergekit's validators take it as a number."""
    r = parse_recipe_text(
        "merge_method: karcher\nmodels: [a, b]\nparameters: {tol: 1e-5, max_iter: 10}\n"
    )
    assert r.parameters == {"tol": 1e-5, "max_iter": 10}
    r = parse_recipe_text(
        "merge_method: nearswap\nbase_model: a\nmodels: [b]\nparameters:\n  t: [{filter: mlp, value: 2e-3}, {value: 1e-3}]\n"
    )
    assert r.parameters["t"] == [{"filter": "mlp", "value": 2e-3}, {"value": 1e-3}]


def test_dtype_names_checked_at_parse_time_with_the_key(tmp_path):
    from mlxmerge.io.dtypes import parse_float_dtype

    base = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]}
    # mergekit's dtype_from_name strips "torch."; configs and recipes copied from them carry it.
    assert parse_recipe({**base, "dtype": "torch.bfloat16"}).dtype == "torch.bfloat16"
    assert parse_float_dtype("torch.float16") == parse_float_dtype("float16")
    p = tmp_path / "r.yml"
    p.write_text(
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: bf17\n"
    )
    with pytest.raises(RecipeError, match=r"r.yml: dtype: unknown dtype 'bf17'"):
        parse_recipe(p)
    with pytest.raises(RecipeError, match=r"out_dtype: unknown dtype 'fp8'"):
        parse_recipe({**base, "out_dtype": "fp8"})


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_parameter_values_are_refused(family, bad):
    recipe = {"merge_method": "linear", "models": [
        {"model": str(family["model_a"]), "parameters": {"weight": bad}},
        {"model": str(family["model_b"]), "parameters": {"weight": 1.0}}]}  # fmt: skip
    from mlxmerge.merge.plan import plan_merge

    with pytest.raises(RecipeError, match="weight.*finite number"):
        plan_merge(recipe)
