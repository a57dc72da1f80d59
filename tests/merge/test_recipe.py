"""Recipe parsing and mergekit's parameter resolution (gradients, filters, precedence)."""

import numpy as np
import pytest

from mlxmerge.errors import RecipeError
from mlxmerge.merge.recipe import Slice, Source, evaluate_setting, parse_recipe, resolve_parameter


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
        (
            {"merge_method": "linear", "models": ["a"], "paramters": {}},
            "unknown key .paramters.*did you mean .parameters.",
        ),
        ({"models": ["a"]}, "merge_method is missing"),
        ({"merge_method": "linear"}, "exactly one of models or slices"),
        (
            {"merge_method": "linear", "models": ["a"], "slices": []},
            "exactly one of models or slices",
        ),
        (
            {"merge_method": "linear", "models": ["a"], "tokenizer_source": "union"},
            "union is not supported",
        ),
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
    with pytest.raises(RecipeError, match="nope.yml: cannot read"):
        parse_recipe(tmp_path / "nope.yml")


def test_source_and_slice_types():
    r = parse_recipe(
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}],
        }
    )
    assert r.slices == [Slice([Source("a", (0, 2), {})], {})]
