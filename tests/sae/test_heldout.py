"""Held-out numbers are held out: training never reads the held-out rows, the split falls on a
context boundary, and the reported eval_* / heldout_* metrics are those rows' numbers."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.sae import load_sae, train
from mlxmerge.sae.activations import ActivationStore, ArraySource
from mlxmerge.sae.heldout import split_held_out
from mlxmerge.sae.model import SAEError
from mlxmerge.sae.train import TrainConfig, train_sae


class Spy(ArraySource):
    """Records every row index that is read."""

    def __init__(self, acts):
        super().__init__(acts)
        self.seen = []

    def rows(self, index):
        self.seen.append(np.asarray(index).copy())
        return super().rows(index)


def test_training_never_reads_held_out_rows():
    rng = np.random.default_rng(0)
    spy = Spy(rng.standard_normal((2000, 16)).astype(np.float32))
    part, held = split_held_out(spy, 0.2)
    np.testing.assert_array_equal(held, spy.acts[1600:])  # the tail, in order
    spy.seen.clear()
    tc = TrainConfig(k=4, expansion=2, tokens=128 * 20, batch_size=128, log_every=10,
                     init_samples=512)  # fmt: skip
    r = train_sae(part, tc, held_out=held)
    seen = np.concatenate(spy.seen)
    assert len(seen) >= 128 * 20 and seen.max() < 1600 and seen.min() >= 0
    # every history row carries the held-out numbers of the SAE as it stood then
    assert all({"heldout_fvu", "heldout_l0", "heldout_dead_fraction"} <= set(h) for h in r.history)
    # the last row's held-out FVU is the numpy FVU of the final SAE on the held-out rows
    from mlxmerge.sae.model import decode, encode

    x = held.astype(np.float64)
    x_hat = np.array(decode(r.params, encode(r.params, r.cfg, mx.array(held))), np.float64)
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert r.history[-1]["heldout_fvu"] == pytest.approx(fvu, rel=1e-4)


def test_split_is_at_a_context_boundary_and_reported(tmp_path, acts_dir):
    out = tmp_path / "s"
    summary = train(out, acts=acts_dir, layer=2, k=4, expansion=2, tokens=256 * 8,
                    batch_size=256, log_every=4, held_out=0.1)  # fmt: skip
    store = ActivationStore(acts_dir, 2)
    _, index, _ = store.tokens()
    n_held = summary["eval_tokens"]
    start = len(store) - n_held
    assert 0.1 * len(store) <= n_held < 0.1 * len(store) + 64  # moved back to a context start
    assert index[start - 1, 0] != index[start, 0]  # no context is split between the two sides
    history = json.loads((out / "history.json").read_text())
    assert "heldout_fvu" in history[-1]
    # eval_fvu is the saved SAE's FVU on exactly those tokens (numpy TopK forward)
    cfg, p = load_sae(out)
    x = store.rows(np.arange(start, len(store))).astype(np.float64)
    pre = (x - np.array(p["b_dec"])) @ np.array(p["encoder"]).T + np.array(p["b_enc"])
    idx = np.argsort(-pre, axis=1)[:, : cfg.k]
    z = np.zeros_like(pre)
    np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    x_hat = z @ np.array(p["W_dec"]) + np.array(p["b_dec"])
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert summary["eval_fvu"] == pytest.approx(fvu, rel=1e-4)
    with pytest.raises(SAEError, match="--held-out must be a fraction"):
        split_held_out(store, 1.0)


def test_sources_without_rows(caplog):
    from mlxmerge.demo.toy_sae import ToyData

    toy = ToyData(d_in=8, n_features=16)  # a generator: held-out rows are a fresh draw
    same, held = split_held_out(toy, 0.05)
    assert same is toy and held.shape == (16384, 8)

    class Stream:  # a stream that cannot set rows aside: nothing is held out, and it says so
        d_in = 8

        def sample(self, n, rng):
            raise AssertionError("a sample of training rows must not be labelled held out")

    with caplog.at_level("WARNING"):
        assert split_held_out(Stream(), 0.05)[1] is None
    assert "nothing is held out" in caplog.text


def test_on_the_fly_holds_out_last_documents(tmp_path, tiny_model, text_file, monkeypatch):
    """On the fly, the last documents are run once for the held-out rows and never streamed."""
    from mlxmerge.sae import pipeline
    from mlxmerge.sae.activations import read_texts

    docs = read_texts(text_file)
    streamed = {}
    real = pipeline._streaming_source

    def spy(model, tok, texts, *a, **kw):
        streamed["texts"] = list(texts)
        return real(model, tok, texts, *a, **kw)

    monkeypatch.setattr(pipeline, "_streaming_source", spy)
    r = pipeline.train(tmp_path / "fly", model=tiny_model, layer=1, data=text_file, k=8,
                       expansion=2, tokens=2048, batch_size=256, held_out=0.1)  # fmt: skip
    n_held = round(0.1 * len(docs))
    assert streamed["texts"] == docs[: len(docs) - n_held]
    assert "eval_fvu" in r and "train_sample_fvu" not in r
