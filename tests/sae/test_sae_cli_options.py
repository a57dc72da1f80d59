"""`sae` commands: one spelling for the output, the SAE's own context size, chat prompts, warnings."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.sae import save_sae
from mlxmerge.sae.model import SAEConfig


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_collect_takes_output_like_every_command_and_keeps_out(tmp_path, tiny_model, text_file):
    r = run("sae", "collect", tiny_model, "--layer", "0", "--data", text_file, "--tokens", "200",
            "--context-size", "32", "--output", tmp_path / "a")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["tokens"] == 200
    assert "ran out" not in r.output
    r = run("sae", "collect", tiny_model, "--layer", "0", "--data", text_file, "--tokens", "100",
            "--context-size", "32", "--out", tmp_path / "b")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "meta.json").is_file()
    help_text = run("sae", "collect", "--help").output
    assert "-o, --output" in help_text and "--out " not in help_text
    r = run("sae", "collect", tiny_model, "--layer", "0", "--data", text_file)
    assert r.exit_code == 2 and "-o/--output" in r.output
    for command in ("train", "features"):  # the other sae commands spell it the same way
        help_text = run("sae", command, "--help").output
        assert "-o, --output" in help_text and "--out " not in help_text


def test_collect_says_when_the_corpus_runs_out(tmp_path, tiny_model):
    small = tmp_path / "small.txt"
    small.write_text("a short text\nanother short one\n")
    r = run("sae", "collect", tiny_model, "--layer", "1", "--data", small, "--tokens", "50K",
            "--context-size", "32", "-o", tmp_path / "c")  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "c" / "meta.json").read_text())["tokens"]
    assert 0 < got < 50_000
    assert f"ran out after {got} tokens of the 50000 asked for" in r.output


def test_eval_scores_at_the_sae_own_context_size(trained_sae, tiny_model, text_file):
    folder, _ = trained_sae
    own = json.loads((folder / "cfg.json").read_text())["metadata"]["context_size"]
    assert own == 64  # the fixture collected with --context-size 64; the old default was 128
    base = ["sae", "eval", folder, tiny_model, "--data", text_file, "--tokens", "300", "--json"]
    r = run(*base)
    assert r.exit_code == 0, r.output
    default = json.loads(r.stdout)
    assert default["context_size"] == own
    r = run(*base, "--context-size", "32")
    assert r.exit_code == 0, r.output
    shorter = json.loads(r.stdout)
    assert shorter["context_size"] == 32 and shorter["fvu"] != default["fvu"]


def test_eval_warns_when_zero_ablation_beats_the_clean_model(tmp_path, tiny_model, text_file):
    # Zeroing the last block's output makes the final norm output 0, so logits are 0 and the
    # zero-ablated CE is log(vocab) (up to the BOS position, which is never replaced); the
    # untrained tiny model does worse than uniform.
    d, layer = 64, 2
    eye = mx.eye(d)
    params = {"encoder": mx.concatenate([eye, -eye]), "b_enc": mx.zeros((2 * d,)),
              "W_dec": mx.concatenate([eye, -eye]), "b_dec": mx.zeros((d,))}  # fmt: skip
    cfg = SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", hook_layer=layer)
    folder = save_sae(tmp_path / "identity", cfg, params)
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    r = run("sae", "eval", folder, tiny_model, "--data", text_file, "--tokens", "300", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["ce_zero"] == pytest.approx(math.log(vocab), abs=0.05)
    assert res["ce_zero"] <= res["ce_clean"]
    assert len(res["warnings"]) == 1 and "loss_recovered is meaningless" in res["warnings"][0]
    r = run("sae", "eval", folder, tiny_model, "--data", text_file, "--tokens", "300")
    assert "warning: zero-ablating layer 2 does not raise the loss" in r.output


def test_steer_chat_wraps_the_prompt_in_the_chat_template(trained_sae, tiny_model):
    from mlx_lm import generate, load

    folder, _ = trained_sae
    args = ["sae", "steer", folder, tiny_model, "--feature", "3", "--scale", "0",
            "--prompt", "hello there", "--max-tokens", "6"]  # fmt: skip
    r = run(*args, "--chat")
    assert r.exit_code == 0, r.output
    model, tok = load(str(tiny_model))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hello there"}], add_generation_prompt=True, tokenize=True
    )
    want = generate(model, tok, ids, max_tokens=6, verbose=False)
    plain = r.output.split("--- plain\n", 1)[1].split("\n--- steered", 1)[0]
    assert plain == want
    assert r.output.rstrip("\n").endswith(want)  # scale 0: the steered text is the same
    assert "--chat" in run("sae", "steer", "--help").output


@pytest.mark.parametrize(
    "option, value",
    [("--tokens", 0), ("--batch-size", 0), ("--expansion", -1), ("--k", 0), ("--lr", -1)],
)
def test_train_refuses_non_positive_sizes_before_any_work(tmp_path, tiny_model, option, value):
    # batch-size 0 was a ZeroDivisionError traceback; tokens 0 wrote an untrained SAE; expansion
    # -1 said "k is larger than d_sae=-32"; a negative lr trained uphill.
    r = run("sae", "train", tiny_model, "--layer", "0", "--data", tmp_path / "missing.txt",
            "-o", tmp_path / "s", option, value)  # fmt: skip
    assert r.exit_code != 0
    assert f"Error: {option} must be" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "option, value, says",
    [("--tokens", "0", "--tokens must be at least 1"),
     ("--context-size", "1", "--context-size must be at least 2"),
     ("--context-size", "0", "--context-size must be at least 2")],
)  # fmt: skip
def test_collect_refuses_empty_rows_and_zero_tokens(
    tmp_path, tiny_model, text_file, option, value, says
):
    # context 1 (BOS only) was a ZeroDivisionError; context 0 and tokens 0 wrote a cache anyway.
    r = run("sae", "collect", tiny_model, "--layer", "0", "--data", text_file, "-o", tmp_path / "a",
            option, value)  # fmt: skip
    assert r.exit_code != 0 and f"Error: {says}" in r.output, r.output
    assert not (tmp_path / "a").exists()
