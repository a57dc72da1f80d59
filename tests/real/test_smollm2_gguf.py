"""A released GGUF (SmolLM2-135M-Instruct, Q4_1, llama.cpp's converter) through every kind of verb,
against transformers' own GGUF loader on the same file."""

from __future__ import annotations  # noqa: I001

import json

import mlxmerge  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.io import open_checkpoint

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed La dame de fer, it was constructed as the centrepiece "
    "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution."
)
STRINGS = [
    "Hello world, how are you today?",
    "Café naïve façade — déjà vu, Ærøskøbing",
    "東京は日本の首都です。北京是中国的首都。",
    "emoji 🙂🚀👍🏽 and symbols ∑ ≠ ∞",
    "  indented\tcode():\n    return x\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """transformers on the same file: its config (a dict parsed from the GGUF), float32 tensors
    under HF names, and the model running them. The module tree it maps names onto is built
    from our config.json (one GGUF parse fewer); the names and values are transformers' own."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(open_checkpoint(smollm2_gguf).path), dtype=torch.float32
        )
    parsed = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)
    tensors = parsed["tensors"]
    model.to_empty(device="cpu")
    model.load_state_dict(tensors, strict=False, assign=True)  # lm_head is tied to the embedding
    model.tie_weights()
    # to_empty leaves buffers outside the state dict (rotary inv_freq) uninitialized: rebuild
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return parsed["config"], tensors, model.eval()


def test_inspect(smollm2_gguf):
    info = json.loads(run("inspect", smollm2_gguf, "--json"))
    assert info["gguf"]["types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert info["gguf"]["tensors"]["model.embed_tokens.weight"] == "Q8_0"
    assert (info["model_type"], info["layers"], info["hidden_size"], info["vocab_size"]) == (
        "llama", 30, 576, 49152,
    )  # fmt: skip
    assert info["tied_embeddings"] and info["parameters"] == 134_515_008


def test_tensors_config_and_tokenizer_match_transformers(smollm2_gguf, reference):
    from transformers import AutoTokenizer

    cfg, tensors, _ = reference
    ckpt = open_checkpoint(smollm2_gguf)
    assert sorted(tensors) == sorted(ckpt.names())
    for name, expected in tensors.items():
        assert np.array_equal(np.array(ckpt.get(name, mx.float32)), expected.numpy()), name
    c = ckpt.config
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):  # fmt: skip
        assert c[key] == cfg[key], key
    assert c["rope_theta"] == cfg["rope_theta"] == 100000.0
    ours = AutoTokenizer.from_pretrained(ckpt.path)
    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in STRINGS:
        assert ours.encode(text) == ref.encode(text), text
    chat = [{"role": "user", "content": "Name a French city."}]
    assert ours.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(
        chat, tokenize=False
    )
    # llama.cpp's "smollm" pre-tokenizer isolates digits (as SmolLM2's own tokenizer.json does).
    assert ours.convert_ids_to_tokens(ours.encode("1889")) == ["1", "8", "8", "9"]


def test_logits_and_perplexity_match_transformers(smollm2_gguf, reference, tmp_path):
    from mlxmerge.eval.scoring import evaluate, prepare
    from mlxmerge.eval.tasks import load_task
    from mlxmerge.lm.load import load

    _, _, ref = reference
    model, tokenizer = load(smollm2_gguf)
    ids = tokenizer.encode(TEXT)
    got = np.array(model(mx.array([ids]))[0])
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=2e-3)
    (tmp_path / "text.txt").write_text(TEXT)
    ppl = evaluate([str(smollm2_gguf)], [str(tmp_path / "text.txt")], max_length=48)
    ppl = ppl["results"][0]["metrics"]["perplexity"]
    windows = prepare(load_task(tmp_path / "text.txt"), tokenizer, max_length=48).windows
    nll, n = 0.0, 0
    for w in windows:
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([w])).logits[0, :-1].double(), -1)
        nll -= logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
        n += len(w) - 1
    assert ppl == pytest.approx(float(np.exp(nll / n)), rel=1e-3)  # float32 vs float64 sums
    assert ppl < 30  # a trained model on plain English


def test_convert_to_hf_and_slerp_with_its_copy(smollm2_gguf, reference, tmp_path):
    """GGUF → HF folder that transformers loads (bf16 of the same values); a slerp of the GGUF
    with that copy at t=0.5 (both directions the same model: the slerp returns it)."""
    from transformers import AutoModelForCausalLM

    _, tensors, _ = reference
    run("convert", smollm2_gguf, "-o", tmp_path / "hf", "--format", "hf", "--dtype", "bfloat16")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    state = hf.state_dict()
    for name in ("model.layers.7.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        assert torch.equal(state[name], tensors[name].to(torch.bfloat16)), name
    run("slerp", smollm2_gguf, tmp_path / "hf", "--t", "0.5", "-o", tmp_path / "slerp",
        "--out-dtype", "bfloat16")  # fmt: skip
    out = open_checkpoint(tmp_path / "slerp")
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        np.testing.assert_allclose(
            np.array(out.get(name, mx.float32)), tensors[name].numpy(), rtol=2e-2, atol=2e-3
        )


def test_gguf_round_trip_runs_in_transformers(smollm2_gguf, reference, tmp_path):
    """GGUF (Q4_1) → ours → GGUF (f16) → transformers: the logits within f16 rounding."""
    from transformers import AutoModelForCausalLM

    _, _, ref = reference
    run("convert", smollm2_gguf, "-o", tmp_path / "rt", "--format", "gguf", "--gguf-type", "f16")
    (out,) = (tmp_path / "rt").glob("*.gguf")
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    ids = torch.tensor(
        [open_checkpoint(smollm2_gguf).config["bos_token_id"], 504, 3575, 282, 4649, 314]
    )
    with torch.no_grad():
        a = ref(ids[None]).logits[0]
        b = back(ids[None]).logits[0]
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert (a - b).abs().max() < 0.01 * a.abs().max()
