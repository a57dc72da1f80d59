"""Genome ↔ recipe: mergekit-evolve's mapping (mergekit/evo/genome.py), checked against recipes
written out by hand, and the config's one-line errors."""

import math

import numpy as np
import pytest
import yaml

from mlxmerge.errors import RecipeError
from mlxmerge.evolve.config import parse_config
from mlxmerge.evolve.genome import Genome, GenomeDefinition


def ties_genome(**kw) -> Genome:
    d = GenomeDefinition(models=("a", "b"), merge_method="ties", base_model="base",
                         layer_granularity=2, filters=("mlp",), **kw)  # fmt: skip
    return Genome(d, num_layers=4)


# genes in (group, model, filter set, param) order; param 0 = weight, 1 = density
GENES = np.array([
    0.5, 0.9,   -0.25, 1.5,     # group 0, model a: mlp set, catch-all set
    -0.75, -0.1, 2.0, 0.3,      # group 0, model b
    0.1, 0.2, 0.3, 0.4,         # group 1, model a
    1.0, -2.0, -0.5, 0.0,       # group 1, model b
])  # fmt: skip


def test_ties_genome_maps_to_the_hand_written_recipe():
    g = ties_genome()
    assert g.shape == (2, 2, 2, 2) and g.size == 16
    # weight = |gene|, density = clamp(|gene|, 0, 1); one slice per group of 2 layers; the base a
    # parameterless source; normalize true by default for ties, int8_mask true (mergekit)
    expected = {
        "merge_method": "ties",
        "base_model": "base",
        "slices": [
            {"sources": [
                {"model": "a", "layer_range": [0, 2], "parameters": {
                    "weight": [{"filter": "mlp", "value": 0.5}, {"filter": None, "value": 0.25}],
                    "density": [{"filter": "mlp", "value": 0.9}, {"filter": None, "value": 1.0}]}},
                {"model": "b", "layer_range": [0, 2], "parameters": {
                    "weight": [{"filter": "mlp", "value": 0.75}, {"filter": None, "value": 2.0}],
                    "density": [{"filter": "mlp", "value": 0.1}, {"filter": None, "value": 0.3}]}},
                {"model": "base", "layer_range": [0, 2]},
            ]},
            {"sources": [
                {"model": "a", "layer_range": [2, 4], "parameters": {
                    "weight": [{"filter": "mlp", "value": 0.1}, {"filter": None, "value": 0.3}],
                    "density": [{"filter": "mlp", "value": 0.2}, {"filter": None, "value": 0.4}]}},
                {"model": "b", "layer_range": [2, 4], "parameters": {
                    "weight": [{"filter": "mlp", "value": 1.0}, {"filter": None, "value": 0.5}],
                    "density": [{"filter": "mlp", "value": 1.0}, {"filter": None, "value": 0.0}]}},
                {"model": "base", "layer_range": [2, 4]},
            ]},
        ],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
    }  # fmt: skip
    assert g.recipe(GENES, "float32") == expected


def test_negative_weights_and_smooth_gradients():
    g = ties_genome(allow_negative_weights=True, smooth=True, normalize=False)
    r = g.recipe(GENES)
    # smooth: one models entry per model, each value a gradient over the two layer groups
    a, b, base = r["models"]
    assert a == {"model": "a", "parameters": {
        "weight": [{"filter": "mlp", "value": [0.5, 0.1]}, {"filter": None, "value": [-0.25, 0.3]}],
        "density": [{"filter": "mlp", "value": [0.9, 0.2]}, {"filter": None, "value": [1.0, 0.4]}]}}  # fmt: skip
    assert b["parameters"]["weight"] == [{"filter": "mlp", "value": [-0.75, 1.0]},
                                         {"filter": None, "value": [2.0, -0.5]}]  # fmt: skip
    assert base == {"model": "base"}
    assert r["parameters"] == {"normalize": False, "int8_mask": True}


def test_initial_genotype_is_mergekits():
    g = ties_genome()
    x = g.initial().reshape(g.shape)
    assert np.all(x[..., 0] == 0.5) and np.all(x[..., 1] == 1.0)  # weight 1/models, density 1
    r = np.random.default_rng(0)
    assert np.array_equal(g.initial(np.random.default_rng(0)), r.random(16))


def test_linear_without_filters_gives_bare_values():
    d = GenomeDefinition(models=("a", "b", "c"), merge_method="linear")
    g = Genome(d, num_layers=6)
    r = g.recipe(np.array([0.2, -0.3, 0.5]))
    assert g.shape == (1, 3, 1, 1)
    assert [s["parameters"] for s in r["slices"][0]["sources"]] == [
        {"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}]  # fmt: skip
    assert [s["layer_range"] for s in r["slices"][0]["sources"]] == [[0, 6]] * 3
    assert r["parameters"] == {"normalize": True}  # linear declares no int8_mask


def test_slerp_t_is_the_softmax_of_the_pair():
    d = GenomeDefinition(models=("a", "b"), merge_method="slerp", layer_granularity=1)
    g = Genome(d, num_layers=2)
    # group 0: genes (0, ln 3): softmax = (1/4, 3/4), t towards b = 3/4; group 1: (ln 3, 0): 1/4
    # (mergekit would make a the base with t = 1/4 there: the same point of the arc)
    r = g.recipe(np.array([0.0, math.log(3), math.log(3), 0.0]))
    assert r["base_model"] == "a"
    ts = [s["parameters"]["t"] for s in r["slices"]]
    assert ts == pytest.approx([0.75, 0.25], abs=1e-12)
    assert [[src["model"] for src in s["sources"]] for s in r["slices"]] == [["a", "b"]] * 2


def write(tmp_path, text):
    p = tmp_path / "evo.yml"
    p.write_text(text)
    return p


GOOD = """
genome: {models: [a, b], merge_method: ties, base_model: base, layer_granularity: 2}
tasks: [{name: t.jsonl, weight: 2}, u.txt]
"""


def test_config_reads_mergekits_schema(tmp_path):
    cfg = parse_config(write(tmp_path, GOOD))
    assert cfg.genome.models == ("a", "b") and cfg.genome.layer_granularity == 2
    assert [(t.name, t.weight) for t in cfg.tasks] == [("t.jsonl", 2.0), ("u.txt", 1.0)]
    assert cfg.apply_chat_template is False and cfg.search_fraction == 0.5


@pytest.mark.parametrize("edit, message", [
    ({"genome": {"models": ["a", "b"], "merge_method": "ties", "base": "x"}},
     r"unknown key 'base'.*accepted: models, merge_method, base_model"),
    ({"genome": {"models": ["a", "b"], "merge_method": "della"}},
     r"merge_method 'della' cannot be evolved; accepted: linear, task_arithmetic"),
    ({"genome": {"models": ["a", "b"], "merge_method": "ties"}}, r"ties needs a base_model"),
    ({"genome": {"models": ["a", "b", "c"], "merge_method": "slerp"}}, r"exactly two models"),
    ({"num_fewshot": 5}, r"'num_fewshot' is an lm-evaluation-harness option"),
    ({"tasks": [{"name": "t.jsonl", "wieght": 1}]}, r"unknown key 'wieght' \(did you mean 'weight'\?\)"),
    ({"populaton": 3}, r"unknown key 'populaton'.*accepted: genome, tasks"),
    ({"search_fraction": 1.5}, r"search_fraction must be between 0 and 1"),
])  # fmt: skip
def test_config_errors_are_one_line(tmp_path, edit, message):
    raw = yaml.safe_load(GOOD)
    raw.update(edit)
    with pytest.raises(RecipeError, match=message) as e:
        parse_config(write(tmp_path, yaml.safe_dump(raw)))
    assert "\n" not in str(e.value)


def test_layer_granularity_must_divide_the_layers():
    d = GenomeDefinition(models=("a", "b"), merge_method="linear", layer_granularity=3)
    with pytest.raises(
        RecipeError, match="layer_granularity 3 does not divide the models' 4 layers"
    ):
        Genome(d, num_layers=4)


def test_time_limits_parse_to_seconds():
    from mlxmerge.errors import MlxmergeError
    from mlxmerge.evolve.search import parse_duration

    assert [parse_duration(t) for t in ("90", "90s", "30m", "2h", "1h30m", "1.5m")] == [
        90, 90, 1800, 7200, 5400, 90]  # fmt: skip
    for bad in ("", "soon", "5d", "m"):
        with pytest.raises(MlxmergeError, match="expected a duration such as 90s, 30m"):
            parse_duration(bad)


def test_slerp_values_are_the_recipes_t():
    d = GenomeDefinition(models=("a", "b"), merge_method="slerp", base_model="b",
                         layer_granularity=1)  # fmt: skip
    g = Genome(d, num_layers=2)
    genes = np.array(
        [0.0, math.log(3), 1.0, 1.0]
    )  # base b: t towards a = e^{g_a}/(e^{g_a}+e^{g_b})
    r = g.recipe(genes)
    assert r["base_model"] == "b"
    assert [[src["model"] for src in s["sources"]] for s in r["slices"]] == [["b", "a"]] * 2
    ts = [s["parameters"]["t"] for s in r["slices"]]
    assert ts == pytest.approx([0.25, 0.5], abs=1e-12)
    assert g.values(genes)["t"].tolist() == ts
