"""Decoder blocks of any mlx-lm model, the probe swapped into them, and one-line refusals."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from archs import build_arch, build_arch_tokenizer

from mlxmerge.errors import MlxmergeError
from mlxmerge.lm.blocks import Probe, decoder_blocks, probes
from mlxmerge.lm.load import load


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    tok = build_arch_tokenizer(root / "tok")
    return {name: build_arch(name, root / name, tok) for name in ("qwen2", "gpt2")}


def test_pipeline_models_swap_into_the_owning_list(folders):
    # qwen2's Model.layers is a property returning a fresh slice of model.model.layers.
    model, _ = load(folders["qwen2"])
    assert model.layers is not model.layers
    blocks = decoder_blocks(model)
    assert blocks.owner is model.model.layers and len(blocks) == len(model.layers) == 4
    tokens = mx.array([[1, 5, 9, 12, 40]])
    plain = np.array(model(tokens))
    with probes(model, [1]) as found:
        assert isinstance(model.layers[1], Probe) and found[1] is model.layers[1]
        found[1].slot.edit = lambda h: h * 0.5  # an edit really changes the forward pass
        edited = np.array(model(tokens))
        with probes(model) as inner:  # nesting keeps the outer probe
            assert inner[1] is found[1]
        assert isinstance(model.layers[1], Probe)
    assert not any(isinstance(b, Probe) for b in model.layers)
    np.testing.assert_array_equal(np.array(model(tokens)), plain)
    assert np.abs(edited - plain).max() > 1e-4


def test_gpt2_blocks_live_in_h(folders):
    model, _ = load(folders["gpt2"])
    blocks = decoder_blocks(model)
    assert blocks.owner is model.model.h


def test_unknown_model_type_is_refused_in_one_line_naming_the_verb(folders, tmp_path):
    from mlxmerge.eval.scoring import evaluate
    from mlxmerge.sae.activations import collect

    bad = tmp_path / "bad"
    shutil.copytree(folders["qwen2"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "nosuchnet"}))
    (tmp_path / "t.txt").write_text("one two three\n")
    with pytest.raises(MlxmergeError, match="^sae collect does not support model_type 'nosuchnet'"):
        collect(bad, [0], tmp_path / "t.txt", tmp_path / "acts")
    assert not (tmp_path / "acts").exists()
    with pytest.raises(MlxmergeError, match="^eval does not support model_type 'nosuchnet'"):
        evaluate([str(folders["qwen2"]), str(bad)], [tmp_path / "t.txt"])
