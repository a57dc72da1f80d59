"""Tensors that do not match the architecture their config.json describes are refused at open.

The reference is mlx-lm itself: every refused folder here is also one ``mlx_lm.load`` refuses
(checked for each case), and the untouched folder loads in both."""

from __future__ import annotations  # noqa: I001  (mlxmerge must precede mlx.core)

import json
import shutil
import struct
from pathlib import Path

import mlxmerge  # noqa: F401
import mlx.core as mx
import pytest

from mlxmerge.demo.tiny import build_model
from mlxmerge.errors import CheckpointError
from mlxmerge.io import open_checkpoint
from mlxmerge.io.architecture import check_architecture, mlx_lm_model
from mlxmerge.io.checkpoint import Checkpoint
from mlxmerge.io.safetensors_file import TensorEntry


@pytest.fixture(scope="module")
def good(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("arch_check")
    return build_model(root / "good", tokenizer_dir, seed=0, num_layers=2, tie=False)


def edited(good: Path, tmp_path: Path, *, config=None, header=None) -> Path:
    """A copy of ``good`` with config.json and/or the safetensors header edited (same data)."""
    folder = tmp_path / "edited"
    shutil.copytree(good, folder)
    if config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    if header is not None:
        f = folder / "model.safetensors"
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        h = json.loads(data[8 : 8 + n])
        header(h)
        raw = json.dumps(h).encode()
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return folder


def refused_by_both(folder: Path, pattern: str) -> str:
    import mlx_lm

    with pytest.raises(CheckpointError, match=pattern) as err:
        open_checkpoint(folder)
    with pytest.raises(Exception):  # noqa: B017  (mlx-lm raises ValueError or KeyError)
        mlx_lm.load(str(folder))
    return str(err.value)


def test_the_untouched_model_opens(good):
    ckpt = open_checkpoint(good)
    assert "lm_head.weight" in ckpt.names()


def set_(key, value):
    return lambda cfg: cfg.__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (set_("num_hidden_layers", 3), (r"implies \d+ tensor\(s\) the checkpoint lacks: "
                                       r"model\.layers\.2\.")),
        (set_("num_hidden_layers", 1), (r"model\.safetensors: tensor model\.layers\.1\..* is not "
                                       r"a parameter .*num_hidden_layers 1")),
        (set_("hidden_size", 128), (r"tensor lm_head\.weight is \(512, 64\) but "
                                   r"config\.json .*hidden_size 128.* implies \(512, 128\)")),
        (set_("vocab_size", 500), r"is \(512, 64\) but .* implies \(500, 64\)"),
        (set_("intermediate_size", 96), r"mlp\.down_proj\.weight is \(64, 128\) .* \(64, 96\)"),
        (set_("model_type", "qwen2"), (r"model_type qwen2.*lacks: model\.layers\.0\.self_attn\."
                                      r"k_proj\.bias")),
    ],
)  # fmt: skip
def test_a_config_that_disagrees_with_the_tensors(good, tmp_path, edit, pattern):
    refused_by_both(edited(good, tmp_path, config=edit), pattern)


def _reshape(name, shape):
    def edit(h):
        h[name]["shape"] = shape

    return edit


def _rename(old, new):
    def edit(h):
        h[new] = h.pop(old)

    return edit


@pytest.mark.parametrize(
    "edit, pattern",
    [
        # consistent lies: the byte count still matches the new shape
        (_reshape("model.layers.0.mlp.up_proj.weight", [64, 128]),
         r"tensor model\.layers\.0\.mlp\.up_proj\.weight is \(64, 128\) .* implies \(128, 64\)"),
        (_reshape("model.embed_tokens.weight", [512, 8, 8]),
         r"model\.embed_tokens\.weight is \(512, 8, 8\) .* implies \(512, 64\)"),
        # one flipped bit in a header: 'e' (0x65) → '%' (0x25)
        (_rename("model.layers.1.post_attention_layernorm.weight",
                 "model.layers.1.post_attention_lay%rnorm.weight"),
         (r"tensor model\.layers\.1\.post_attention_lay%rnorm\.weight \(is it model\.layers\.1\."
         r"post_attention_layernorm\.weight, misspelt\?\) is not a parameter")),
    ],
)  # fmt: skip
def test_a_header_that_lies(good, tmp_path, edit, pattern):
    message = refused_by_both(edited(good, tmp_path, header=edit), pattern)
    assert "model.safetensors" in message


def test_convert_and_merge_write_nothing(good, tmp_path):
    from click.testing import CliRunner

    from mlxmerge.cli import cli

    bad = edited(good, tmp_path, config=set_("num_hidden_layers", 3))
    for args in (["convert", bad], ["linear", good, bad], ["ties", bad, "--base", good]):
        r = CliRunner().invoke(cli, [*map(str, args), "-o", str(tmp_path / "out")])
        assert r.exit_code != 0 and r.output.startswith("Error: ") and "lacks" in r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "out").exists()


def test_a_model_type_mlx_lm_lacks_is_not_checked(good, tmp_path):
    folder = edited(good, tmp_path, config=set_("model_type", "no_such_architecture"))
    assert open_checkpoint(folder).model_type == "no_such_architecture"


def test_a_config_mlx_lm_cannot_build_is_refused(good, tmp_path):
    folder = edited(good, tmp_path, config=lambda c: c.pop("hidden_size"))
    with pytest.raises(CheckpointError, match=r"config\.json: mlx-lm cannot build a llama.*hidden"):
        open_checkpoint(folder)


def test_the_check_allocates_no_weights(tmp_path):
    """A 7B-shaped llama checked from headers alone: MLX's peak memory stays near zero."""
    from mlx.utils import tree_flatten

    config = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
              "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
              "rms_norm_eps": 1e-5, "vocab_size": 32000, "tie_word_embeddings": False}  # fmt: skip
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(mlx_lm_model(config).parameters())}
    total = sum(2 * int(mx.prod(mx.array(s)).item()) for s in shapes.values())
    assert total > 13e9  # bf16 bytes the weights would take
    entries = {
        n: TensorEntry(n, "BF16", s, tmp_path / "x.safetensors", 0, 0) for n, s in shapes.items()
    }
    ckpt = Checkpoint("7b", tmp_path, config, entries, [])
    mx.reset_peak_memory()
    check_architecture(ckpt)
    assert mx.get_peak_memory() < 50e6
    shapes["model.norm.weight"] = (4095,)
    entries["model.norm.weight"] = TensorEntry("model.norm.weight", "BF16", (4095,), tmp_path, 0, 0)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is \(4095,\)"):
        check_architecture(Checkpoint("7b", tmp_path, config, entries, []))
