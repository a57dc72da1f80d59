"""SAE folders from other tools or broken downloads: one line naming the file, never a traceback."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.sae.model import SAEConfig, init_params
from mlxmerge.sae.saelens import load_sae, save_sae


@pytest.fixture
def sae_folder(tmp_path):
    cfg = SAEConfig(d_in=64, d_sae=128, architecture="topk", k=4, hook_layer=1)
    return save_sae(tmp_path / "sae", cfg, init_params(cfg, seed=0))


def one_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def features(sae, family, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A short document.\n")
    argv = ["sae", "features", sae, family["base"], "--data", corpus, "-o", tmp_path / "report"]
    return CliRunner().invoke(cli, [str(a) for a in argv])


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_truncated_weights_file_is_one_line(sae_folder, family, tmp_path, keep):
    w = sae_folder / "sae_weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: int(len(data) * keep)])
    line = one_line(features(sae_folder, family, tmp_path))
    assert str(w) in line and "truncated" in line
    assert not (tmp_path / "report").exists()


def test_a_cfg_that_is_not_utf8_is_one_line(sae_folder, family, tmp_path):
    cfg = sae_folder / "cfg.json"
    data = cfg.read_bytes().replace(b"{", b'{"note": "caf\xe9", ', 1)
    cfg.write_bytes(data)
    byte = data.index(b"\xe9")
    line = one_line(features(sae_folder, family, tmp_path))
    assert str(cfg) in line and f"byte {byte}" in line and "UTF-8" in line


def test_a_cfg_with_a_bom_loads(sae_folder):
    cfg = sae_folder / "cfg.json"
    before = load_sae(sae_folder)[1]
    cfg.write_bytes(b"\xef\xbb\xbf" + cfg.read_bytes())
    after = load_sae(sae_folder)[1]
    for name in before:
        np.testing.assert_array_equal(np.array(before[name]), np.array(after[name]))


def test_a_cfg_that_is_not_an_object_is_one_line(sae_folder, family, tmp_path):
    (sae_folder / "cfg.json").write_text(json.dumps([1, 2]))
    assert "not a JSON object" in one_line(features(sae_folder, family, tmp_path))
    assert mx.array(1).item() == 1  # mlx still usable after the error
