"""GGUF output loaded by transformers' own GGUF loader (``from_pretrained(folder, gguf_file=...)``).

For tiny llama and qwen2 models written as f16, bf16, q8_0 and q4_0: transformers dequantizes
our file back to the source tensors within each type's error, builds the same model from our
metadata (its logits equal those of the source model given the GGUF's weights), and its
tokenizer, rebuilt from our tokenizer metadata, encodes test strings to the source's ids.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("archs")

from archs import build_arch, build_arch_tokenizer

from mlxmerge.convert import convert

TYPES = ("f16", "bf16", "q8_0", "q4_0")
# Relative error of a weight each type allows (largest |Δ| over the tensor's largest |w|):
# f16 2^-11, bf16 2^-8 (one rounding); q8_0 half a step of amax/127 (+ f16 scale);
# q4_0 up to one step of amax/8 (the clipped top code).
WEIGHT_TOLERANCE = {"f16": 2**-11, "bf16": 2**-8, "q8_0": 0.6 / 127, "q4_0": 1.01 / 8}
TEXTS = [
    "Hello world, the cat sat on the mat.",
    "Café déjà vu, naïve façade",
    "日本語のテキスト 中文",
    "emoji 🦙🚀 done",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf_tf")
    tok = build_arch_tokenizer(root / "tok")
    return {a: build_arch(a, root / a, tok, layout="hf") for a in ("llama", "qwen2")}


def load_gguf(folder: Path):
    (path,) = folder.glob("*.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=path.name, dtype=torch.float32
        )
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
    return model, tok


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_loads_gguf(sources, tmp_path, arch, kind):
    src = sources[arch]
    out = convert(str(src), tmp_path / "out", layout="gguf", gguf_type=kind)
    model, tok = load_gguf(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs)
    for name, w in theirs.items():
        err = (ours[name] - w).abs().max().item()
        scale = w.abs().max().item()
        # norms and biases stay F32: exact; tied/untied output under q4_0 is Q8_0: tighter.
        bound = 0.0 if w.ndim == 1 else WEIGHT_TOLERANCE[kind] * scale
        assert err <= bound, f"{name}: {err} > {bound}"
    ids = torch.tensor([[1, 5, 17, 33, 100, 200, 7, 9, 42, 250]])
    with torch.no_grad():
        got = model(ids).logits
        ref.load_state_dict(ours)  # the source architecture with the GGUF's weights
        want = ref(ids).logits
    # Same weights in, same logits out: our metadata rebuilt the source's config.
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    source_tok = transformers.AutoTokenizer.from_pretrained(src)
    for text in TEXTS:
        assert tok(text).input_ids == source_tok(text).input_ids, text
    assert tok.eos_token == source_tok.eos_token
    assert tok.chat_template == source_tok.chat_template
