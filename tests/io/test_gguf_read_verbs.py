"""A GGUF file as the model of each kind of verb: inspect, convert (MLX and HF layouts), a merge
with a safetensors model, and a forward pass (eval perplexity) against transformers running the
same GGUF."""

from __future__ import annotations  # noqa: I001

import json
import sys
from pathlib import Path

import mlxmerge  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.io import open_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from gguf_tiny import T, write_gguf

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TEXT = "the cat sat on the mat. the heat in the sun is rather hot; she sat in the shade.\n" * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_verbs")
    (root / "model").mkdir()  # outputs go beside the file, in the same folder
    path = write_gguf(
        root / "model" / "tiny.gguf", "llama", qtype=T.Q4_1, types={"attn_v.weight": T.F16}
    )
    return root, path


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_inspect_lists_each_tensors_type(tiny):
    root, path = tiny
    info = json.loads(run("inspect", path, "--json"))
    types = info["gguf"]["tensors"]
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert types["model.layers.1.self_attn.v_proj.weight"] == "F16"
    assert types["model.norm.weight"] == "F32"
    assert info["model_type"] == "llama" and info["layers"] == 2 and info["format"] == "gguf"
    assert "GGUF types" in run("inspect", root / "model")  # the folder holding it


def test_convert_and_merge_keep_the_dequantized_tensors(tiny):
    root, path = tiny
    ckpt = open_checkpoint(path)
    run("convert", path, "-o", root / "model" / "mlx", "--dtype", "float32")
    out = open_checkpoint(root / "model" / "mlx")
    assert out.names() == ckpt.names()
    for name in ckpt.names():
        assert np.array_equal(np.array(out.get(name)), np.array(ckpt.get(name, mx.float32))), name
    assert (root / "model" / "mlx" / "tokenizer.json").is_file()
    refused = CliRunner().invoke(cli, ["convert", str(path), "-o", str(root / "model"), "--force"])
    assert refused.exit_code != 0 and "sit inside the input" in refused.output
    assert path.is_file()
    # A merge of the GGUF with its safetensors copy scaled by 3: the mean is 2 x.
    scaled = {n: np.array(ckpt.get(n, mx.float32)) * 3 for n in ckpt.names()}
    mx.save_safetensors(
        str(root / "model" / "mlx" / "model.safetensors"),
        {n: mx.array(v) for n, v in scaled.items()},
    )
    recipe = root / "r.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {path}\n    parameters: {{weight: 1}}\n"
        f"  - model: {root / 'model' / 'mlx'}\n    parameters: {{weight: 1}}\ndtype: float32\n"
    )
    run("merge", recipe, "-o", root / "merged")
    merged = open_checkpoint(root / "merged")
    for name in ckpt.names():
        np.testing.assert_allclose(
            np.array(merged.get(name)), 2 * scaled[name] / 3, rtol=1e-6, atol=1e-7
        )


def test_forward_pass_matches_transformers_on_the_same_gguf(tiny):
    """mlx-lm's model built from the GGUF (what eval, abliterate, sae load) against transformers
    running the same file: the same logits; eval's perplexity equals that of the converted copy."""
    from transformers import AutoModelForCausalLM

    from mlxmerge.eval.scoring import evaluate
    from mlxmerge.lm.load import load

    root, path = tiny
    model, tokenizer = load(path)
    ids = tokenizer.encode(TEXT)
    ref = AutoModelForCausalLM.from_pretrained(
        root / "model", gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    got = np.array(model(mx.array([ids]))[0])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    (root / "text.txt").write_text(TEXT)
    if not (root / "f32").exists():
        run("convert", path, "-o", root / "f32", "--dtype", "float32")
    scores = evaluate([str(path), str(root / "f32")], [str(root / "text.txt")], max_length=64)
    a, b = (r["metrics"]["perplexity"] for r in scores["results"])
    assert a == pytest.approx(b, rel=1e-5) and 1 < a < 2 * len(tokenizer.vocab)


def test_other_verbs_take_a_gguf(tiny):
    """frankenmerge, extract-lora, moe and sae collect with GGUF inputs (a Q4_1 and a Q8_0 file)."""
    import yaml

    root, path = tiny
    other = write_gguf(root / "model" / "other.gguf", "llama", qtype=T.Q8_0, seed=1)
    out = root / "verbs"
    run("frankenmerge", "--slice", f"{path}:0-2", "--slice", f"{other}:1-2", "-o", out / "fm")
    fm = open_checkpoint(out / "fm")
    assert fm.num_layers == 3
    src = np.array(open_checkpoint(other).get("model.layers.1.mlp.up_proj.weight", mx.float32))
    got = np.array(fm.get("model.layers.2.mlp.up_proj.weight", mx.float32))
    np.testing.assert_allclose(got, src, rtol=1e-2, atol=1e-3)  # bf16 output of the same tensor
    run("extract-lora", other, "--base", path, "--rank", "4", "-o", out / "lora")
    assert (out / "lora" / "adapters.safetensors").is_file()
    cfg = {"base_model": str(path), "dtype": "float32", "gate_mode": "random",
           "experts": [{"source_model": str(path)}, {"source_model": str(other)}]}  # fmt: skip
    (out / "moe.yml").write_text(yaml.safe_dump(cfg))
    run("moe", out / "moe.yml", "-o", out / "moe")
    assert open_checkpoint(out / "moe").model_type == "mixtral"
    (out / "t.txt").write_text(TEXT)
    run("sae", "collect", path, "--layer", "1", "--data", out / "t.txt", "-o", out / "acts")
    assert json.loads((out / "acts" / "meta.json").read_text())["d_in"] == 64


def test_kquant_qwen2_runs_like_transformers(tmp_path):
    """A K-quant GGUF of another architecture (qwen2, biases; Q4_K, Q5_K, Q6_K, Q3_K): the forward
    pass equals transformers' on the same file, and convert + eval run on it."""
    from transformers import AutoModelForCausalLM

    from mlxmerge.eval.scoring import evaluate
    from mlxmerge.lm.load import load

    types = {"attn_q.weight": T.Q4_K, "attn_k.weight": T.Q5_K, "attn_v.weight": T.Q6_K,
             "ffn_down.weight": T.Q3_K, "token_embd.weight": T.Q6_K}  # fmt: skip
    path = write_gguf(tmp_path / "q.gguf", "qwen2", qtype=T.Q4_K, types=types, hidden=256, ff=256,
                      layers=1, heads=4, kv_heads=2)  # fmt: skip
    model, tokenizer = load(path)
    ids = tokenizer.encode(TEXT)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.array(model(mx.array([ids]))[0]), expected, rtol=1e-4, atol=1e-4)
    run("convert", path, "-o", tmp_path / "out", "--dtype", "float32")
    (tmp_path / "t.txt").write_text(TEXT)
    scores = evaluate([str(path), str(tmp_path / "out")], [str(tmp_path / "t.txt")], max_length=64)
    a, b = (r["metrics"]["perplexity"] for r in scores["results"])
    assert a == pytest.approx(b, rel=1e-5)
