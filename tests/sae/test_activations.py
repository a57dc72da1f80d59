"""Activation capture and cache: block outputs, special tokens left out, contexts recoverable."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.lm.blocks import Probe
from mlxmerge.sae.activations import (
    ActivationStore,
    capture_layers,
    collect,
    load_model,
    pack_sequences,
    read_texts,
    special_ids,
)
from mlxmerge.sae.features import unembed
from mlxmerge.sae.model import SAEError


def test_last_block_output_gives_the_model_logits(tiny_model):
    """Block i's output is what the rest of the model reads: for the last block, norm+unembed
    of the captured activation must equal the model's own logits."""
    m, _ = load_model(tiny_model)
    rows = mx.array([[1, 20, 30, 40, 50, 60]])
    with capture_layers(m, [2]) as outs:
        logits = m(rows)
    np.testing.assert_allclose(
        np.array(unembed(m, outs[2])), np.array(logits), rtol=1e-4, atol=1e-4
    )
    assert not any(isinstance(b, Probe) for b in m.layers)  # probes removed


def test_cache_layout_and_special_tokens(acts_dir, tiny_model, text_file):
    meta = json.loads((acts_dir / "meta.json").read_text())
    assert meta["layers"] == [0, 2] and meta["d_in"] == 64 and meta["tokens"] == 3000
    assert len(meta["shards"]) == 3  # shard_tokens=1000
    store = ActivationStore(acts_dir, 2)
    assert len(store) == 3000 and store.d_in == 64
    ids, index, seqs = store.tokens()
    _, tok = load_model(tiny_model)
    assert not np.isin(ids, sorted(special_ids(tok))).any()  # BOS never stored
    assert (seqs[:, 0] == tok.bos_token_id).all()  # each row starts with BOS
    np.testing.assert_array_equal(seqs[index[:, 0], index[:, 1]], ids)  # contexts recoverable
    # stored activations equal a fresh forward pass at the same positions
    m, _ = load_model(tiny_model)
    with capture_layers(m, [0, 2]) as outs:
        m(mx.array(seqs[:2]))
    first = index[:, 0] < 2
    for layer in (0, 2):
        fresh = np.array(outs[layer])[index[first, 0], index[first, 1]]
        np.testing.assert_allclose(ActivationStore(acts_dir, layer).rows(np.nonzero(first)[0]), fresh,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_store_batches_are_rows_of_the_cache(acts_dir):
    store = ActivationStore(acts_dir, 0)
    full = np.concatenate([np.load(acts_dir / "layer_0" / s["file"]) for s in store.meta["shards"]])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(store), 50)
    np.testing.assert_array_equal(store.rows(idx), full[np.sort(idx)])
    assert store.batch(32, rng).shape == (32, 64)


def test_read_texts(text_file, jsonl_file, tmp_path):
    assert len(read_texts(text_file)) == 400
    assert len(read_texts(jsonl_file)) == 100
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SAEError, match="empty data file"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(SAEError, match="needs a string field 'text'"):
        read_texts(tmp_path / "bad.jsonl")
    with pytest.raises(SAEError, match="data file not found"):
        read_texts(tmp_path / "missing.txt")


def test_pack_sequences_rows(tiny_model):
    _, tok = load_model(tiny_model)
    seqs = pack_sequences(tok, ["one two three four five six"] * 20, 8, 30)
    assert seqs.shape[1] == 8 and (seqs[:, 0] == tok.bos_token_id).all()
    assert (seqs.shape[0]) * 7 >= 30


def test_collect_errors(tiny_model, text_file, tmp_path):
    with pytest.raises(SAEError, match=r"layer 7 does not exist: the model has 3 layers \(0..2\)"):
        collect(tiny_model, [7], text_file, tmp_path / "a", tokens=100)
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SAEError, match="empty data file"):
        collect(tiny_model, [0], tmp_path / "empty.txt", tmp_path / "b", tokens=100)
    with pytest.raises(SAEError, match="not an activation cache"):
        ActivationStore(tmp_path)


def test_store_layer_choice(acts_dir):
    with pytest.raises(SAEError, match=r"holds layers \[0, 2\]; choose one"):
        ActivationStore(acts_dir)
    with pytest.raises(SAEError, match=r"layer 1 is not in"):
        ActivationStore(acts_dir, 1)
