"""Inputs that would give a broken model are refused in one line, before anything is written.

Each case goes through the CLI (convert and a merge), so the exit status, the one-line message
and the empty output folder are what a user sees."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.demo.tiny import build_model


def run(args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args])


def refused(result, *fragments: str) -> str:
    """The CLI failed with a one-line ``Error:`` naming each fragment, and no traceback."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("broken")
    return build_model(root / "sharded", tokenizer_dir, seed=0, shard_size=40_000)


def test_a_missing_shard_without_index_stops_convert_and_merge(sharded, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(sharded, folder)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3  # the fixture really is sharded
    (folder / "model.safetensors.index.json").unlink()
    shards[1].unlink()
    refused(run(["convert", folder, "-o", tmp_path / "out"]), shards[1].name, "incomplete")
    refused(run(["linear", folder, sharded, "-o", tmp_path / "out2"]), shards[1].name)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


@pytest.fixture(scope="module")
def with_and_without_bias(tmp_path_factory, tokenizer_dir):
    """Two valid llamas of one shape: one with attention biases (``attention_bias: true``)."""
    from mlx.utils import tree_flatten

    from mlxmerge.demo.tiny import model_from_config, save_weights, tiny_config

    root = tmp_path_factory.mktemp("bias")
    plain = build_model(root / "plain", tokenizer_dir, seed=0, num_layers=2)
    config = {**tiny_config(num_layers=2), "attention_bias": True}
    weights = dict(tree_flatten(model_from_config(config, 1).parameters()))
    assert any(k.endswith("q_proj.bias") for k in weights)
    biased = save_weights(root / "biased", weights, config, tokenizer_dir)
    return plain, biased


@pytest.mark.parametrize("biased_first", [False, True])
def test_every_model_of_a_merge_holds_the_same_tensors(
    with_and_without_bias, tmp_path, biased_first
):
    """The first model used to define the tensor list: the other model's biases were dropped."""
    plain, biased = with_and_without_bias
    models = [biased, plain] if biased_first else [plain, biased]
    line = refused(run(["linear", *models, "-o", tmp_path / "out"]), "model.layers.0.self_attn")
    assert ("lacks" if biased_first else "holds") in line and "same tensors" in line
    assert not (tmp_path / "out").exists()
