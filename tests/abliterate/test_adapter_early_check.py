"""--adapter on a model whose residual writers have biases is refused from the headers alone."""

import pytest
from archs import build_arch, build_arch_tokenizer

import mlxmerge.lm.load
from mlxmerge.abliterate import abliterate
from mlxmerge.errors import MlxmergeError


def test_adapter_on_biased_writers_is_refused_before_any_forward_pass(tmp_path, monkeypatch):
    gpt2 = build_arch("gpt2", tmp_path / "gpt2", build_arch_tokenizer(tmp_path / "tok"))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the adapter check")

    monkeypatch.setattr(mlxmerge.lm.load, "load", no_load)
    with pytest.raises(MlxmergeError, match=r"\.bias: adapter export handles bias-free"):
        abliterate(str(gpt2), tmp_path / "out", adapter=True, direction_layer=2)
    assert not (tmp_path / "out").exists()
