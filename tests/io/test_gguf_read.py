"""GGUF in: tiny GGUFs written by ``gguf.GGUFWriter`` read back against transformers' GGUF loader
(same names, bit-identical float32 tensors, config fields), transformers' own torch dequantizer
for the K-quant and IQ types, and its GGUF tokenizer; header validation; split files."""

from __future__ import annotations  # noqa: I001

import shutil
import struct
import sys
from pathlib import Path

import mlxmerge  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.errors import CheckpointError
from mlxmerge.io import open_checkpoint
from mlxmerge.io import gguf_names

sys.path.insert(0, str(Path(__file__).parent))
from gguf_tiny import T, write_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def transformers_tensors(path: Path) -> tuple[dict, object]:
    """transformers' GGUF loader: (tensors dequantized to float32 under HF names, its config)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    out = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    return {k: v.float().numpy() for k, v in out["tensors"].items()}, cfg


def ours_as_hf(ckpt, hf_name: str) -> np.ndarray:
    """Our tensor for an HF name (transformers fuses MoE gate and up into one gate_up_proj)."""
    if hf_name.endswith("mlp.experts.gate_up_proj"):
        stem = hf_name.removesuffix("experts.gate_up_proj") + "switch_mlp."
        parts = [np.array(ckpt.get(f"{stem}{p}_proj.weight", mx.float32)) for p in ("gate", "up")]
        return np.concatenate(parts, axis=1)
    if hf_name.endswith("mlp.experts.down_proj"):
        hf_name = hf_name.removesuffix("experts.down_proj") + "switch_mlp.down_proj.weight"
    return np.array(ckpt.get(hf_name, mx.float32))


CASES = {
    "llama": {"model_type": "llama", "qtype": T.Q4_1,
                  "types": {"attn_v.weight": T.F16, "attn_k.weight": T.BF16, "ffn_down.weight": T.Q8_0}},
    "qwen2": {"model_type": "qwen2", "qtype": T.Q4_0, "types": {"ffn_up.weight": T.Q5_1}},
    "gemma3_text": {"model_type": "gemma3_text", "qtype": T.Q8_0, "head_dim": 32},
    "qwen3_moe": {"model_type": "qwen3_moe", "qtype": T.Q5_0, "types": {"attn_q.weight": T.F16}},
    "phi3": {"model_type": "phi3", "qtype": T.Q4_1},
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_tensors_and_config_match_transformers(tmp_path, case):
    path = write_gguf(tmp_path / f"{case}.gguf", **CASES[case])
    ckpt = open_checkpoint(path)
    ref, cfg = transformers_tensors(path)
    assert len(ref) == len(ckpt.names()) - sum("switch_mlp.up_proj" in n for n in ckpt.names())
    for name, expected in ref.items():
        got = ours_as_hf(ckpt, name)
        assert got.shape == expected.shape, name
        assert np.array_equal(got, expected), (
            f"{name} ({ckpt.gguf_type(name) if name in ckpt else 'moe'})"
        )
    c = ckpt.config
    assert c["model_type"] == cfg.model_type
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):  # fmt: skip
        assert c[key] == getattr(cfg, key), key
    assert c["rms_norm_eps"] == pytest.approx(cfg.rms_norm_eps, rel=1e-7)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]) == head_dim
    rope = cfg.rope_parameters
    theta = rope["full_attention"]["rope_theta"] if "full_attention" in rope else rope["rope_theta"]
    assert c["rope_theta"] == theta
    if case == "qwen3_moe":
        assert (c["num_experts"], c["num_experts_per_tok"]) == (
            cfg.num_experts,
            cfg.num_experts_per_tok,
        )


KQUANTS = {"attn_q.weight": T.Q4_K, "attn_k.weight": T.Q6_K, "attn_v.weight": T.Q5_K,
           "attn_output.weight": T.Q3_K, "ffn_gate.weight": T.Q2_K, "ffn_up.weight": T.IQ4_XS,
           "ffn_down.weight": T.IQ4_NL, "token_embd.weight": T.IQ2_XXS, "output.weight": T.IQ3_S}  # fmt: skip


def test_kquants_match_transformers_torch_dequantizer(tmp_path):
    """Blocks gguf cannot write, decoded by gguf (ours) and by transformers' separate torch port;
    Q/K rows un-interleaved by the formula below (llama.cpp stores each head's rotary halves
    interleaved: GGUF row 2i is row i, row 2i+1 is row i + d/2)."""
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    path = write_gguf(tmp_path / "k.gguf", "llama", hidden=256, ff=256, heads=4, kv_heads=2,
                      layers=1, vocab=512, types=KQUANTS)  # fmt: skip
    ckpt = open_checkpoint(path)
    seen = set()
    for name in ckpt.names():
        s = ckpt.sources[name]
        raw = np.memmap(path, np.uint8, "r", s.tensor.offset, (s.tensor.nbytes,))
        if s.tensor.type.name == "F32":
            continue
        seen.add(s.tensor.type.name)
        ref = torch_dequantize(torch.from_numpy(np.array(raw)), int(s.tensor.type)).numpy()
        ref = ref.reshape(s.tensor.shape)
        if s.permute is not None:
            heads = 4 if s.permute == 0 else 2
            g = ref.reshape(heads, -1, ref.shape[-1])
            ref = np.concatenate([g[:, 0::2], g[:, 1::2]], axis=1).reshape(ref.shape)
        got = np.array(ckpt.get(name, mx.float32))
        np.testing.assert_array_equal(got, ref, err_msg=f"{name} {s.tensor.type.name}")
    assert seen == {t.name for t in KQUANTS.values()}


def test_permute_inverts_llama_cpp_and_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads, kv in ((8, 8), (8, 2)):
        rows = (kv if kv != heads else heads) * 16
        x = w[:rows]
        p = gguf_names.permute(x, heads, kv)
        assert not np.array_equal(p, x)
        np.testing.assert_array_equal(gguf_names.unpermute(p, heads, kv), x)
        ref = LlamaTensorProcessor()._reverse_permute_weights(p, heads, kv)
        np.testing.assert_array_equal(gguf_names.unpermute(p, heads, kv), ref)


STRINGS = [
    "Hello world, the cat sat on the mat.",
    "Café naïve façade — déjà vu",
    "東京は日本の首都です。",
    "emoji 🙂🚀 and more",
    "  leading spaces\tand\ttabs\nnew line   three  two",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.parametrize(
    ("kind", "model_type"), [("gpt2", "llama"), ("llama", "llama"), ("llama", "gemma3_text")]
)
def test_tokenizer_matches_transformers(tmp_path, kind, model_type):
    from transformers import AutoTokenizer

    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    path = write_gguf(tmp_path / f"{kind}.gguf", model_type, tokenizer=kind, chat_template=template)
    ckpt = open_checkpoint(path)
    ours = AutoTokenizer.from_pretrained(ckpt.path)  # what mlx-lm loads
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in STRINGS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == ref.decode(
            ref.encode(text), skip_special_tokens=False
        )
    assert (ckpt.path / "chat_template.jinja").read_text() == template
    assert ours.bos_token == ref.bos_token and ours.eos_token == ref.eos_token
    if kind == "gpt2":  # llama.cpp's "smollm" split isolates each digit (transformers does not)
        assert len(ours.encode("2024")) == 4


def test_split_gguf_reads_like_one_file(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "split").mkdir()
    one = write_gguf(tmp_path / "one" / "m.gguf", "qwen2", qtype=T.Q8_0)
    write_gguf(tmp_path / "split" / "m.gguf", "qwen2", qtype=T.Q8_0, split_max_tensors=7)
    parts = sorted((tmp_path / "split").glob("*.gguf"))
    assert len(parts) > 2 and parts[0].name == f"m-00001-of-{len(parts):05d}.gguf"
    a = open_checkpoint(one)
    for ref in (parts[1], tmp_path / "split"):  # any part, or the folder
        b = open_checkpoint(ref)
        assert b.names() == a.names() and b.config == a.config
        for name in a.names():
            assert np.array_equal(np.array(a.get(name)), np.array(b.get(name))), name
    parts[-1].unlink()
    with pytest.raises(CheckpointError, match="lacks"):
        open_checkpoint(parts[0])


def _tensor_info_pos(path: Path, name: str) -> int:
    """Byte offset of ``name``'s entry in the tensor table (just after the name)."""
    data = path.read_bytes()
    key = struct.pack("<Q", len(name)) + name.encode()
    return data.index(key) + len(key)


def _patch(path: Path, pos: int, fmt: str, value) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(struct.pack(fmt, value))


def test_header_errors_are_one_line(tmp_path):
    good = write_gguf(tmp_path / "good.gguf", "llama", layers=1)
    before = good.read_bytes()
    name = "blk.0.attn_q.weight"

    def variant(tag: str) -> Path:
        p = tmp_path / tag / "m.gguf"
        p.parent.mkdir()
        shutil.copy(good, p)
        return p

    p = variant("type")
    pos = _tensor_info_pos(p, name)
    _patch(p, pos + 4 + 2 * 8, "<I", 99)  # n_dims, two dims, then the type
    with pytest.raises(CheckpointError, match=rf"{name} has unknown ggml type 99"):
        open_checkpoint(p)
    p = variant("offset")
    _patch(p, _tensor_info_pos(p, name) + 4 + 2 * 8 + 4, "<Q", 1 << 40)
    with pytest.raises(CheckpointError, match=rf"{name} lies outside the file"):
        open_checkpoint(p)
    p = variant("truncated")
    p.write_bytes(good.read_bytes()[: good.stat().st_size - 100])
    with pytest.raises(CheckpointError, match="lies outside the file.*truncated"):
        open_checkpoint(p)
    p = variant("header")
    p.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="runs past the end"):
        open_checkpoint(p)
    p = variant("magic")
    p.write_bytes(b"GGML" + good.read_bytes()[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        open_checkpoint(p)
    p = variant("arch")
    data = good.read_bytes()
    p.write_bytes(data.replace(b"llama", b"mamba"))  # key prefixes and the architecture value
    with pytest.raises(CheckpointError, match="architecture 'mamba' is not supported"):
        open_checkpoint(p)
    shutil.copy(good, tmp_path / "arch" / "other.gguf")
    with pytest.raises(CheckpointError, match="several GGUF models"):
        open_checkpoint(tmp_path / "arch")
    open_checkpoint(good).get("model.layers.0.self_attn.q_proj.weight")
    assert good.read_bytes() == before  # inputs are never written to


def test_convert_quantize_carries_q4_q8_blocks_exactly(tmp_path):
    """GGUF Q4_0/Q4_1 (4-bit) and Q8_0 (8-bit) blocks become MLX affine quantization at group
    size 32 with no float round trip: MLX's dequantization equals gguf's bit for bit (float32
    scales), Q/K rows un-permuted with the packed words; other types go through mx.quantize."""
    from click.testing import CliRunner

    from mlxmerge.cli import cli

    types = {"attn_q.weight": T.Q4_0, "attn_k.weight": T.Q4_1, "ffn_up.weight": T.Q8_0,
             "ffn_down.weight": T.Q4_1, "attn_v.weight": T.F16}  # fmt: skip
    path = write_gguf(tmp_path / "m.gguf", "llama", qtype=T.Q4_0, types=types)
    ckpt = open_checkpoint(path)
    for bits, carried in ((4, {"Q4_0", "Q4_1"}), (8, {"Q8_0"})):
        out = tmp_path / f"q{bits}"
        res = CliRunner().invoke(cli, ["convert", str(path), "-o", str(out), "--quantize", str(bits),
                                       "--group-size", "32", "--dtype", "float32"])  # fmt: skip
        assert res.exit_code == 0, res.output
        n = sum(ckpt.gguf_type(name) in carried for name in ckpt.names())
        assert f"{n} GGUF tensors' blocks carried into MLX {bits}-bit" in res.output
        assert f"{n} GGUF tensors' blocks carried" in (out / "README.md").read_text()
        q = open_checkpoint(out)
        for name in ckpt.names():
            if ckpt.gguf_type(name) not in carried:
                continue
            assert q.is_quantized(name) and q.quant_params(name)["bits"] == bits
            expected = np.array(ckpt.get(name, mx.float32))
            np.testing.assert_array_equal(np.array(q.get(name, mx.float32)), expected, err_msg=name)
        # A type MLX cannot hold as it is: re-quantized from float, within a quantization step.
        name = "model.layers.0.self_attn.v_proj.weight"
        x = np.array(ckpt.get(name, mx.float32))
        assert 0 < np.abs(np.array(q.get(name, mx.float32)) - x).max() < 0.2 * np.abs(x).max()


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
         "num_hidden_layers": 30, "intermediate_size": 1536, "rms_norm_eps": 1e-5,
         "rope_theta": 100000.0, "max_position_embeddings": 8192, "vocab_size": 49152},
        {"model_type": "mixtral", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 32, "num_hidden_layers": 2, "intermediate_size": 128, "num_local_experts": 4,
         "num_experts_per_tok": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "vocab_size": 300},
        {"model_type": "phi3", "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
         "num_hidden_layers": 2, "intermediate_size": 256, "partial_rotary_factor": 0.75,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 300},
        {"model_type": "gemma2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 32, "num_hidden_layers": 2, "intermediate_size": 128, "sliding_window": 128,
         "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0, "vocab_size": 300},
    ],
    ids=lambda c: c["model_type"],
)  # fmt: skip
def test_config_survives_metadata_and_back(config):
    """config.json → GGUF metadata (what the writer stores) → config.json (what the reader builds)."""
    fields = {k: v for k, v, _ in gguf_names.metadata_from_config(config)}
    arch = gguf_names.gguf_arch(config["model_type"])
    back = gguf_names.config_from_metadata(arch, fields, {"output.weight"}, None)
    assert back["model_type"] == config["model_type"]  # llama with experts reads as mixtral
    for key, value in config.items():
        if key != "model_type":
            assert back[key] == pytest.approx(value, rel=1e-6), key
