"""Overlapped merges (reader and writer threads) write the same bytes as sequential ones."""

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.io import ShardedWriter, TensorSpec
from mlxmerge.merge.runner import merge


def shard_bytes(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


def recipe(method, family):
    models = [{"model": str(family[k]), "parameters": {"weight": w, "density": 0.6}}
              for k, w in (("model_a", 0.7), ("model_b", 0.4))]  # fmt: skip
    r = {"merge_method": method, "base_model": str(family["base"]),
         "models": [{"model": str(family["base"])}, *models], "dtype": "float32"}  # fmt: skip
    if method == "slerp":
        r = {"merge_method": "slerp", "base_model": str(family["model_a"]),
             "models": [{"model": str(family["model_a"])}, {"model": str(family["model_b"])}],
             "parameters": {"t": [0.0, 0.3, 1.0]}}  # fmt: skip
    return r


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_overlap_writes_the_sequential_bytes(family, tmp_path, method):
    seq = merge(recipe(method, family), tmp_path / "seq", overlap=False, shard_size="200KB")
    par = merge(recipe(method, family), tmp_path / "par", overlap=True, shard_size="200KB")
    a, b = shard_bytes(seq), shard_bytes(par)
    assert len(a) > 1 and a == b


def test_writer_thread_errors_reach_the_caller(tmp_path, monkeypatch):
    specs = [TensorSpec(f"t{i}", (4, 4), mx.float32) for i in range(4)]
    calls = []

    def broken(self, shard, array):
        calls.append(shard)
        raise OSError("disk full")

    monkeypatch.setattr(ShardedWriter, "_write_bytes", broken)
    with (
        pytest.raises(OSError, match="disk full"),
        ShardedWriter(tmp_path, specs, background=True) as w,
    ):
        for s in specs:
            w.write(s.name, mx.zeros(s.shape))
    assert calls == [0]  # the writer stops at its first error


def test_background_writer_matches_foreground(tmp_path):
    rng = np.random.default_rng(0)
    specs = [TensorSpec(f"t{i}", (16 + i, 8), mx.bfloat16) for i in range(6)]
    data = {s.name: rng.normal(size=s.shape).astype(np.float32) for s in specs}
    for bg in (False, True):
        (tmp_path / str(bg)).mkdir()
        with ShardedWriter(tmp_path / str(bg), specs, shard_size=600, background=bg) as w:
            for s in specs:
                w.write(s.name, mx.array(data[s.name]))
    assert shard_bytes(tmp_path / "False") == shard_bytes(tmp_path / "True")
