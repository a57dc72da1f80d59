"""GGUF output run by llama.cpp itself (llama-cpp-python; the optional ``llamacpp`` test extra).

Next-token logits of our GGUF files in llama.cpp are compared with mlx-lm on

- the same weights (our GGUF as mlxmerge reads it back: the source with each tensor quantized
  and dequantized): they may differ only by llama.cpp's arithmetic, bounded per type by the
  precision its CPU matmuls convert activations to (``RUNTIME``);
- the source model: that difference plus the type's own quantization error, which mlx-lm
  measures on the same inputs (the first comparison's reference vs the source).

llama.cpp runs with an f32 KV cache so that the f32 file is compared without the f16 cache's
rounding; bounds are relative to the largest source logit.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("archs")

import mlx.core as mx
from archs import build_arch, build_arch_tokenizer

from mlxmerge.convert import convert
from mlxmerge.lm.load import load

# llama.cpp's CPU matmul converts the activations to the weights' "vec_dot" type: f32 stays
# f32 (only summation order differs), f16 rounds them to 2^-11, bf16 to 2^-8, the block types
# quantize them to Q8_0/Q8_1 blocks (steps of amax/127). Relative bounds on the logits after 4
# random layers, ~10x the per-element rounding (these random models amplify errors by ~10).
# f32: llama.cpp's GELU reads an f16 table (GGML_GELU_FP16): gemma2 differs by ~7e-4.
RUNTIME = {"f32": 2e-3, "f16": 5e-3, "bf16": 4e-2, "q8_0": 0.1, "q4_0": 0.1, "q4_1": 0.1,
           "q5_0": 0.1, "q5_1": 0.1}  # fmt: skip
IDS = [1, 5, 17, 33, 100, 200, 7, 9, 42, 250, 3, 77, 123, 45, 6, 99]
CASES = [("llama", t) for t in ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_1")] + [
    ("qwen2", "q4_1"), ("qwen2", "q5_0"), ("gemma2", "q8_0"), ("mixtral", "q8_0"),
    ("phi3", "f32"),
]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf_llamacpp")
    build_arch_tokenizer(root / "tok")
    return root


@functools.cache
def source(root: Path, arch: str) -> tuple[Path, np.ndarray]:
    """The source folder of ``arch`` and its logits in mlx-lm."""
    path = build_arch(arch, root / f"src-{arch}", root / "tok", layout="hf")
    return path, mlx_logits(path)


def mlx_logits(folder) -> np.ndarray:
    model, _ = load(str(folder))
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


def llama_cpp_logits(folder: Path) -> np.ndarray:
    (path,) = folder.glob("*.gguf")
    f32 = 0  # GGML_TYPE_F32 for the KV cache
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1,
                          verbose=False, type_k=f32, type_v=f32)  # fmt: skip
    llm.eval(IDS)
    out = np.array(llm.scores[: len(IDS)], dtype=np.float32)
    llm.close()
    return out


@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_llama_cpp_runs_our_gguf(root, tmp_path, arch, kind):
    src, want_src = source(root, arch)
    # (a folder named after the model: llama.cpp keys phi-3 token fixes on general.name)
    out = convert(str(src), tmp_path / "model", layout="gguf", gguf_type=kind)
    want_same = mlx_logits(out)
    got = llama_cpp_logits(out)
    scale = np.abs(want_src).max()
    runtime = np.abs(got - want_same).max() / scale
    assert runtime <= RUNTIME[kind], f"llama.cpp vs mlx-lm on the same weights: {runtime:.2e}"
    quant = np.abs(want_same - want_src).max() / scale
    total = np.abs(got - want_src).max() / scale
    assert total <= quant + RUNTIME[kind]
    if kind == "f32":
        assert quant == 0
        assert (got.argmax(-1) == want_src.argmax(-1)).all()


def test_llama_cpp_runs_a_merge_written_as_gguf(root, tmp_path):
    """A linear merge written as q8_0 GGUF runs in llama.cpp like the same merge written as MLX."""
    from mlxmerge.merge.runner import merge

    a = build_arch("llama", tmp_path / "a", root / "tok", layout="hf", perturb=0.05)
    b = build_arch("llama", tmp_path / "b", root / "tok", layout="hf", perturb=0.1, seed=0)
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
              {"model": str(b), "parameters": {"weight": 0.5}}], "dtype": "float32"}  # fmt: skip
    mlx_out = merge(recipe, tmp_path / "mlx")
    gguf_out = merge(recipe, tmp_path / "gguf", layout="gguf", gguf_type="q8_0")
    want, same, got = mlx_logits(mlx_out), mlx_logits(gguf_out), llama_cpp_logits(gguf_out)
    scale = np.abs(want).max()
    assert np.abs(got - same).max() / scale <= RUNTIME["q8_0"]
    assert np.abs(got - want).max() / scale <= np.abs(same - want).max() / scale + RUNTIME["q8_0"]


@pytest.mark.parametrize(("kind", "main_type"), [("q4_k_m", "Q4_K"), ("q6_k", "Q6_K")])
def test_k_quants_by_llama_cpp(root, tmp_path, kind, main_type):
    """q4_k_m / q6_k: our bf16 GGUF quantized by llama.cpp's own quantizer, run by llama.cpp."""
    import gguf

    from mlxmerge.demo.tiny import build_model, build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    src = build_model(tmp_path / "src", tok, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=2, tie=False)  # fmt: skip
    out = convert(str(src), tmp_path / "model", layout="gguf", gguf_type=kind)
    (path,) = out.glob("*.gguf")
    assert path.name.endswith(f"-{kind.upper()}.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_gate.weight"] == main_type  # rows of 256: K-quant blocks fit
    assert types["blk.0.attn_norm.weight"] == "F32"
    want_src, want_same, got = mlx_logits(src), mlx_logits(out), llama_cpp_logits(out)
    scale = np.abs(want_src).max()
    assert np.abs(got - want_same).max() / scale <= RUNTIME["q8_0"]  # activations in Q8_K
    assert np.abs(got - want_src).max() / scale <= np.abs(want_same - want_src).max() / scale + RUNTIME["q8_0"]  # fmt: skip
