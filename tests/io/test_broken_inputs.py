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
