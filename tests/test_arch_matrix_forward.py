"""The forward-pass verbs over the architecture matrix (tests/archs.py).

* ``sae collect``: stored activations equal block i's output computed by truncating mlx-lm's own
  model after block i (its embedding, mask and blocks, no final norm), no probe involved;
* ``abliterate --direction-layer`` (MLX and HF layout): the exported weights give the logits of
  inference-time ablation of the same direction, and only residual writers change;
* eval: batched (left-padded) logits, perplexity and greedy generation equal unbatched runs.

``tests/arch_table.py`` turns the outcomes into docs/architectures.md's columns.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from archs import ARCHS, build_arch, build_arch_tokenizer
from mlx import nn

from mlxmerge.abliterate.architectures import ARCHITECTURES, architecture, writer_tensors
from mlxmerge.errors import MlxmergeError
from mlxmerge.io import open_checkpoint
from mlxmerge.lm.blocks import decoder_blocks
from mlxmerge.lm.chat import chat_tokens, eos_token_ids
from mlxmerge.lm.generate import can_batch, generate_tokens, last_logits
from mlxmerge.lm.load import load

NAMES = sorted(ARCHS)
LAYOUTS = ("mlx", "hf")
TEXT = [
    "the cat sat on the warm river bank and looked at the moon",
    "one two three four five six seven eight nine ten",
    "a small dog ran after a large tree in the dark",
]
PROMPTS = ["Tell me a story about the sun", "red", "What is one plus two, and why?", "Hi cat"]
# The module mlx-lm calls after the last block, per architecture (default "norm").
FINAL_NORM = {"gpt2": "ln_f", "phi": "final_layernorm"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(name, layout) → model folder, built on first use (seed 0, float32)."""
    root = tmp_path_factory.mktemp("matrix")
    tok = build_arch_tokenizer(root / "tok")
    built: dict[tuple[str, str], object] = {}

    def get(name: str, layout: str = "mlx"):
        if (name, layout) not in built:
            built[name, layout] = build_arch(name, root / f"{name}-{layout}", tok, layout=layout)
        return built[name, layout]

    return get


def _block_output(model: nn.Module, tokens: mx.array, layer: int) -> mx.array:
    """Block ``layer``'s output from mlx-lm's inner model with the later blocks and final norm cut."""
    blocks = decoder_blocks(model)
    inner = model.model
    kept = blocks.owner[:]
    norm_name = FINAL_NORM.get(model.model_type, "norm")
    norm = inner[norm_name]
    del blocks.owner[blocks.offset + layer + 1 :]
    inner[norm_name] = nn.Identity()
    try:
        return inner(tokens, None)  # no cache (phi requires the argument)
    finally:
        blocks.owner[:] = kept
        inner[norm_name] = norm


# MLX layout only: mlx-lm loads an HF-layout folder into the same weights (the weights matrix
# checks that), so the forward pass cannot differ; abliterate's export does, and runs both.
@pytest.mark.parametrize("name", NAMES)
def test_sae_collect_equals_an_independent_forward_pass(models, name, tmp_path, layout="mlx"):
    from mlxmerge.sae.activations import collect

    path = models(name, layout)
    data = tmp_path / "t.txt"
    data.write_text("\n".join(TEXT))
    layers = [1, 3]
    meta = collect(path, layers, data, tmp_path / "acts", tokens=40, context_size=16,
                   batch_rows=8)  # fmt: skip
    model, _ = load(path)
    seqs = np.load(tmp_path / "acts" / "sequences.npy")
    index = np.load(tmp_path / "acts" / "index" / "00000.npy")
    cfg = ARCHS[name]
    assert meta["d_in"] == cfg.get("hidden_size", cfg.get("n_embd"))
    assert meta["tokens"] == len(index) == 40
    for layer in layers:
        got = np.load(tmp_path / "acts" / f"layer_{layer}" / "00000.npy")
        ref = np.array(_block_output(model, mx.array(seqs), layer).astype(mx.float32))
        want = ref[index[:, 0], index[:, 1]]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        assert np.abs(want).max() > 1e-3  # a real signal, not zeros


def _prompts(tmp_path):
    harmful = [f"how do I break the {w} thing {i}" for i, w in enumerate("abcdefghij")]
    harmless = [f"write a story about the {w} cat {i}" for i, w in enumerate("abcdefghij")]
    (tmp_path / "harmful.txt").write_text("\n".join(harmful))
    (tmp_path / "harmless.txt").write_text("\n".join(harmless))
    return tmp_path / "harmful.txt", tmp_path / "harmless.txt"


ABLITERATE = [n for n in NAMES if ARCHS[n]["model_type"] in ARCHITECTURES]
REFUSED = [n for n in NAMES if ARCHS[n]["model_type"] not in ARCHITECTURES]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ABLITERATE)
def test_abliterate_export_equals_inference_time_ablation(models, name, layout, tmp_path, caplog):
    from mlxmerge.abliterate.hooks import Instrumented
    from mlxmerge.abliterate.pipeline import abliterate

    path = models(name, layout)
    harmful, harmless = _prompts(tmp_path)
    out = tmp_path / "out"
    report = abliterate(
        path, out, harmful=harmful, harmless=harmless, direction_layer=2, batch_size=4,
        n_val=2, max_tokens=2, dtype="float32", layout=layout, evaluate=False,
    )  # fmt: skip
    assert "refuses none" in caplog.text  # a random model: forced by --direction-layer, warned
    r = mx.array(np.array(report["direction"]["vector"], dtype=np.float32))

    # Only residual writers change, and some do.
    base, edited = open_checkpoint(path), open_checkpoint(out)
    writers = {w.name for w in writer_tensors(base.names(), architecture(base.model_type))}
    assert set(edited.names()) == set(base.names())
    changed = {
        n for n in base.names()
        if not np.array_equal(np.array(base.get(n, mx.float32)), np.array(edited.get(n, mx.float32)))
    }  # fmt: skip
    assert changed and changed <= writers

    # The saved model computes what the inference-time projection computes.
    model, tok = load(path)
    inst = Instrumented(model, architecture(base.model_type))
    lists = chat_tokens(tok, PROMPTS)
    with inst.installed():
        inst.set_ablation(r, report["attn_weights"], report["mlp_weights"])
        want = np.array(model(mx.array([lists[0]])).astype(mx.float32))
        plain_ablated = np.array(last_logits(model, lists, batch_size=4))
    new, _ = load(out)
    got = np.array(new(mx.array([lists[0]])).astype(mx.float32))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(
        np.array(last_logits(new, lists, batch_size=4)), plain_ablated, atol=1e-4, rtol=1e-4
    )
    base_logits = np.array(model(mx.array([lists[0]])).astype(mx.float32))
    assert np.abs(base_logits - want).max() > 1e-4  # the edit does something


@pytest.mark.parametrize("name", REFUSED)
def test_abliterate_refuses_unsupported_architectures_in_one_line(models, name, tmp_path):
    from mlxmerge.abliterate.pipeline import abliterate

    harmful, harmless = _prompts(tmp_path)
    model_type = ARCHS[name]["model_type"]
    with pytest.raises(
        MlxmergeError, match=f"abliterate does not support model_type '{model_type}'"
    ) as e:
        abliterate(models(name), tmp_path / "out", harmful=harmful, harmless=harmless)
    assert not (tmp_path / "out").exists() and "\n" not in str(e.value)
    # Checked; recorded as a skip so tests/arch_table.py writes "refused" in the table.
    pytest.skip(str(e.value).split(" (known")[0])


def _window_model(models):
    """gemma3_text with a 4-token sliding window: prompts and answers run past it."""
    from archs import arch_config

    ARCHS["gemma3_text_window4"] = {**arch_config("gemma3_text"), "sliding_window": 4}
    try:
        return models("gemma3_text_window4")
    finally:
        del ARCHS["gemma3_text_window4"]


@pytest.mark.parametrize("name", [*NAMES, "gemma3_text_window4"])
def test_eval_batched_equals_unbatched(models, name):
    from mlxmerge.eval.scoring import document_windows, perplexity

    model, tok = load(_window_model(models) if name == "gemma3_text_window4" else models(name))
    lists = chat_tokens(tok, PROMPTS)
    assert len({len(t) for t in lists}) > 1  # padding really happens
    assert can_batch(model)  # the batched path runs (no fallback to one prompt at a time)
    batched = np.array(last_logits(model, lists, batch_size=4))
    single = np.stack([np.array(last_logits(model, [t], batch_size=1))[0] for t in lists])
    np.testing.assert_allclose(batched, single, atol=1e-4, rtol=1e-4)

    windows = document_windows(tok, TEXT, 12)
    ppl = [perplexity([model], windows, 100, batch_size=b)["perplexity"] for b in (1, 4)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)

    eos = eos_token_ids(tok)
    gen = [generate_tokens(model, lists, eos_ids=eos, max_tokens=6, batch_size=b) for b in (1, 4)]
    assert gen[0] == gen[1]
    assert any(gen[0])


def test_matrix_is_documented():
    """docs/architectures.md (tests/arch_table.py) has every arch; abliterate's column matches."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "architectures.md").read_text()
    lines = [ln for ln in doc.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = {}
    for ln in lines[1:]:  # the |---| rule does not start with "| "
        cells = [c.strip() for c in ln.split("|")[1:-1]]
        rows[cells[0]] = dict(zip(header, cells))
    for name in NAMES:
        t = ARCHS[name]["model_type"]
        row = rows[t if name == t else f"{t} ({name})"]
        assert row["sae collect"] == "yes" and row["eval"] == "yes", name
        assert row["abliterate"].startswith("refused" if name in REFUSED else "yes"), name


def test_issue_rows_through_the_cli(models, tmp_path):
    """Issue 9's forward-pass rows, as a user types them: Qwen2 sae collect and abliterate
    (pipeline-style ``model.layers``), Gemma 2 batched generation (GQA with a 5-D mask)."""
    from click.testing import CliRunner

    from mlxmerge.cli import cli

    qwen2, gemma2 = str(models("qwen2")), str(models("gemma2"))
    (tmp_path / "t.txt").write_text("\n".join(TEXT))
    rows = [{"prompt": p, "answer": "x"} for p in PROMPTS]
    (tmp_path / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    harmful, harmless = _prompts(tmp_path)
    run = CliRunner().invoke

    r = run(cli, ["sae", "collect", qwen2, "--layer", "1", "--data", str(tmp_path / "t.txt"),
                  "-o", str(tmp_path / "acts"), "--tokens", "20"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run(cli, ["eval", gemma2, "--task", str(tmp_path / "gen.jsonl"), "--chat",
                  "--max-tokens", "3", "--batch-size", "4", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"][0]["metrics"]["items"] == len(PROMPTS)
    args = ["abliterate", qwen2, "--harmful", str(harmful), "--harmless", str(harmless),
            "--batch-size", "4", "--max-tokens", "2", "--no-eval"]  # fmt: skip
    r = run(cli, [*args, "-o", str(tmp_path / "a")])
    assert r.exit_code != 0 and "refuses none" in r.output
    assert "--markers FILE" in r.output and "--direction-layer" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "a").exists()
    r = run(cli, [*args, "-o", str(tmp_path / "b"), "--direction-layer", "2"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "abliteration.json").is_file()
