"""Scoring against independent references: numpy log-softmax of the logits, hand-made bigram
models with known probabilities, mlx-lm's own greedy generation."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx import nn

from mlxmerge.cli import cli
from mlxmerge.errors import MlxmergeError
from mlxmerge.eval import scoring
from mlxmerge.eval.scoring import Sample, evaluate, generation_scores, sample, token_logprobs
from mlxmerge.eval.tasks import ChoiceItem, GenerationItem, TaskError, load_task

DOCS = [
    "The small cat reads a book about the moon.\nTwo plus three equals five.",
    "Red river, blue tree, old house. " * 11 + "The end.",
    "Why can you tell me the answer?",
]


@pytest.fixture(scope="module")
def tiny(family):
    """(model, tokenizer, folder) of the family's base model."""
    return (*scoring.load_model(str(family["base"])), str(family["base"]))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    (root / "text.txt").write_text("\n\n".join(DOCS))
    gen = [
        {"prompt": f"{a} + {b} =", "answer": a + b} for a, b in [(1, 2), (10, 5), (3, 3), (7, 40)]
    ]
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    mc = [
        {"prompt": f"{a} + 1 =", "choices": [f" {a + 1}", f" {a + 2}", " cat"], "answer": 0}
        for a in range(4)
    ]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (root / "bad.jsonl").write_text(json.dumps({"prompt": "a", "choices": ["x", "y"], "answer": 0}) + "\n"
                                    + json.dumps({"prompt": "b", "choices": ["x", "y"], "answer": 5}) + "\n")  # fmt: skip
    return root


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_perplexity_matches_numpy_from_logits(tiny, files):
    model, tok, _ = tiny
    max_length = 24  # forces several windows per long document
    nll, count = 0.0, 0
    for doc in DOCS:
        ids = tok.encode(doc)
        start = 0
        while start < len(ids) - 1:
            w = ids[start : start + max_length]
            logits = np.array(model(mx.array([w]))[0].astype(mx.float32))
            lp = np_log_softmax(logits)[:-1]
            nll -= lp[np.arange(len(w) - 1), w[1:]].sum()
            count += len(w) - 1
            start += max_length - 1
        assert count > 0
    expected = math.exp(nll / count)
    report = evaluate([tiny[2]], [files / "text.txt"], max_length=max_length, batch_size=3)
    m = report["results"][0]["metrics"]
    assert m["tokens"] == count == sum(len(tok.encode(d)) - 1 for d in DOCS)
    assert m["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(
        nll / math.log(2) / sum(len(d.encode()) for d in DOCS), rel=1e-4
    )


class Bigram(nn.Module):
    """A model whose next-token log-probabilities depend on the last token only: table[token]."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = mx.array(table.astype(np.float32))

    def __call__(self, tokens, cache=None):
        return self.table[tokens]


class CharTokenizer:
    """One token per character (ids 1..26 for a..z, 27 for space), BOS 0."""

    pad_token_id = 0

    def encode(self, text, add_special_tokens=True):
        ids = [27 if c == " " else ord(c) - 96 for c in text]
        return ([0] if add_special_tokens else []) + ids


def bigram_table(pairs: dict, default=-8.0, vocab=28):
    """log-probabilities: pairs[(a, b)] = log p(b | a) (as text characters), the rest uniform-ish."""
    t = np.full((vocab, vocab), default)
    enc = CharTokenizer().encode
    for (a, b), lp in pairs.items():
        t[enc(a, False)[0], enc(b, False)[0]] = lp
    return t


def test_multiple_choice_hand_made_cases():
    tok = CharTokenizer()
    # After 'q' the model strongly prefers ' ' then 'a'; each letter after 'a' costs 1 nat.
    pairs = {("q", " "): -0.1, (" ", "a"): -3.0, (" ", "b"): -3.5}
    pairs.update({(c, d): -1.0 for c, d in zip("abcdefg", "bcdefgh")})
    model = Bigram(bigram_table(pairs))
    items = [
        # sum: " a" = -0.1-3.0 = -3.1; " abcdefgh" = -0.1-3.0-7 = -10.1 → picks 0.
        # per byte: -3.1/2 = -1.55 vs -10.1/9 = -1.12 → picks 1.
        ChoiceItem("q", [" a", " abcdefgh"], 1),
        # " b" (-3.6) beats " z" (-0.1-8) in both.
        ChoiceItem("q", [" z", " b"], 1),
    ]
    reqs = scoring.choice_requests(tok, items)
    assert reqs[0] == ([0, 17, 27, 1], 2)
    res = scoring.choice_scores([model], items, reqs, batch_size=2)
    assert res["predictions"] == [0, 1] and res["predictions_norm"] == [1, 1]
    assert res["accuracy"] == 0.5 and res["accuracy_norm"] == 1.0


def test_token_logprobs_padding_and_ensemble():
    rng = np.random.default_rng(0)
    t1, t2 = rng.normal(size=(28, 28)), rng.normal(size=(28, 28))
    m1, m2 = Bigram(t1), Bigram(t2)
    seqs = [[0, 3, 5, 7, 2], [0, 1], [0, 9, 9, 9]]
    got = token_logprobs([m1, m2], seqs, batch_size=2, pad_id=0)
    for s, lp in zip(seqs, got):
        p = (np.exp(np_log_softmax(t1)) + np.exp(np_log_softmax(t2))) / 2
        want = np.log(p[s[:-1], s[1:]])
        np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-5)
    # An ensemble of one model twice is that model.
    one = token_logprobs([m1], seqs)
    twice = token_logprobs([m1, m1], seqs)
    for a, b in zip(one, twice):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_samples_1_temperature_0_equals_mlx_lm_greedy(tiny, files):
    import mlx_lm

    model, tok, _ = tiny
    task = load_task(files / "gen.jsonl")
    prompts = [tok.encode(it.prompt) for it in task.items]
    ours = sample([model], prompts, eos_ids={tok.eos_token_id}, n=1, max_tokens=10, temperature=0.0,
                  batch_size=3, pad_id=tok.pad_token_id)  # fmt: skip
    for p, row in zip(prompts, ours):
        ref = [r.token for r in mlx_lm.stream_generate(model, tok, prompt=p, max_tokens=10)]
        assert row[0].tokens == [t for t in ref if t != tok.eos_token_id]
    # The whole eval path at --samples 1 reports the greedy answers.
    report = evaluate([tiny[2]], [task], samples=1, max_tokens=10, batch_size=2)
    answers = report["results"][0]["metrics"]["answers"]
    assert answers == [scoring.extract_answer(tok.decode(r[0].tokens), None) for r in ours]


def test_sampling_is_seeded_and_top_p_small_is_greedy(tiny):
    model, tok, _ = tiny
    prompts = [tok.encode("One two"), tok.encode("The cat")]
    kw = {"eos_ids": {tok.eos_token_id}, "max_tokens": 6, "batch_size": 4}
    a = sample([model], prompts, n=3, temperature=1.0, seed=1, **kw)
    b = sample([model], prompts, n=3, temperature=1.0, seed=1, **kw)
    assert [[s.tokens for s in r] for r in a] == [[s.tokens for s in r] for r in b]
    assert len({tuple(s.tokens) for r in a for s in r}) > 1  # not all the same
    greedy = sample([model], prompts, n=1, temperature=0.0, **kw)
    nucleus = sample([model], prompts, n=2, temperature=1.0, top_p=1e-6, seed=3, **kw)
    for g, r in zip(greedy, nucleus):
        assert all(s.tokens == g[0].tokens for s in r)


class JoinTokenizer:
    def decode(self, tokens):
        return "".join(tokens)


def test_votes_on_hand_made_samples():
    items = [GenerationItem("p1", "7"), GenerationItem("p2", "3")]

    def s(text, logprob, cost=2):
        return Sample(list(text), cost, logprob)

    samples = [
        # majority@4 -> "8" (2 of 4, first seen), best-of -> "7" (highest mean logprob)
        [s("8", -4.0), s("7", -0.5), s("8", -3.0), s("9", -2.0)],
        [s("3", -1.0), s("3", -1.0), s("5", -0.1), s("4", -9.0)],
    ]
    res = generation_scores(JoinTokenizer(), items, samples, None, "majority")
    curve = {c["samples"]: c for c in res["curve"]}
    assert sorted(curve) == [1, 2, 4]
    assert curve[1]["majority"] == 0.5 and curve[1]["any_correct"] == 0.5  # "8" wrong, "3" right
    assert curve[2]["any_correct"] == 1.0
    assert curve[2]["best_of"] == 1.0  # "7" (-0.25/token) and "3"
    assert curve[4]["majority"] == 0.5  # "8" beats "7"; "3" twice
    assert curve[4]["best_of"] == 0.5  # "7" right, "5" (-0.05/token) wrong
    assert curve[4]["tokens"] == 16 and curve[4]["tokens_per_correct"] == 16
    assert res["exact_match"] == 0.5 and res["exact_match_first_sample"] == 0.5
    with pytest.raises(MlxmergeError, match="unknown vote 'mean'"):
        generation_scores(JoinTokenizer(), items, samples, None, "mean")


def test_eval_errors(tiny, files):
    base = tiny[2]
    with pytest.raises(MlxmergeError, match="--samples needs a generation task"):
        evaluate([base], [files / "mc.jsonl"], samples=4)
    with pytest.raises(TaskError, match=r"bad\.jsonl line 2: answer index 5 is out of range"):
        evaluate([base], [files / "bad.jsonl"])
    with pytest.raises(MlxmergeError, match="batch size must be at least 1"):
        evaluate([base], [files / "mc.jsonl"], batch_size=0)
    with pytest.raises(MlxmergeError, match="max length must be at least 2"):
        evaluate([base], [files / "text.txt"], max_length=1)
    with pytest.raises(MlxmergeError):
        evaluate([str(files / "no-model")], [files / "mc.jsonl"])


def test_cli_eval_ranks_models_and_writes_json(family, files):
    runner = CliRunner()
    args = ["eval", str(family["base"]), str(family["stranger"]), "--task", str(files / "text.txt"),
            "--task", str(files / "mc.jsonl")]  # fmt: skip
    res = runner.invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    ppl = {r["model"]: r["score"] for r in report["results"] if r["task"] == "text"}
    assert report["ranking"]["text"] == sorted(ppl, key=ppl.get)
    assert {r["task"] for r in report["results"]} == {"text", "mc"}
    table = runner.invoke(cli, args)
    assert table.exit_code == 0 and "rank" in table.output and "perplexity" in table.output
    bad = runner.invoke(cli, ["eval", str(family["base"]), "--task", str(files / "bad.jsonl")])
    assert bad.exit_code == 1 and "Error:" in bad.output and "line 2" in bad.output


def test_cli_samples_curve_and_plot(family, files, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curve.png"
    res = CliRunner().invoke(cli, ["eval", str(family["base"]), "--task", str(files / "gen.jsonl"),
                                   "--samples", "3", "--max-tokens", "4", "--plot", str(png)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "majority" in res.output and "tokens_per_correct" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(cli, ["eval", str(family["base"]), "--task", str(files / "gen.jsonl"),
                                   "--plot", str(png)])  # fmt: skip
    assert res.exit_code == 2 and "--samples 2 or more" in res.output
