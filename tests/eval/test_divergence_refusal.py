import json

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.errors import MlxmergeError
from mlxmerge.eval.divergence import perplexity
from mlxmerge.eval.prompts import read_prompts
from mlxmerge.eval.refusal import REFUSAL_MARKERS, is_refusal, read_markers, refusal_rate
from mlxmerge.lm.logprobs import kl_divergence


def _np_kl(a, b):
    a = a - a.max(-1, keepdims=True)
    b = b - b.max(-1, keepdims=True)
    la = a - np.log(np.exp(a).sum(-1, keepdims=True))
    lb = b - np.log(np.exp(b).sum(-1, keepdims=True))
    return (np.exp(la) * (la - lb)).sum(-1)


def test_kl_matches_numpy_formula_and_is_zero_on_itself():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 50)) * 3, rng.normal(size=(5, 50)) * 3
    got = np.array(kl_divergence(mx.array(a), mx.array(b)))
    np.testing.assert_allclose(got, _np_kl(a, b), rtol=1e-4, atol=1e-6)
    assert np.allclose(np.array(kl_divergence(mx.array(a), mx.array(a))), 0, atol=1e-6)
    # Raw logits with huge values stay finite (no -inf from processed scores).
    big = mx.array(a * 1000)
    assert np.isfinite(np.array(kl_divergence(big, mx.array(b)))).all()


def test_perplexity_matches_unpadded_numpy_cross_entropy(tiny_random):
    _, model, tokenizer = tiny_random
    texts = [
        "The cat sat on the red house.",
        "one two",
        "Why can you tell me how the river is blue",
    ]
    nll, n = 0.0, 0
    for t in texts:
        ids = tokenizer.encode(t)
        logits = np.array(model(mx.array([ids[:-1]]))[0].astype(mx.float32), dtype=np.float64)
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        nll -= sum(logp[j, ids[j + 1]] for j in range(len(ids) - 1))
        n += len(ids) - 1
    assert perplexity(model, tokenizer, texts, batch_size=3) == pytest.approx(
        np.exp(nll / n), rel=1e-3
    )


def test_refusal_markers_normalization_and_empty_answers():
    assert is_refusal("I can\u2019t help with that.")
    assert is_refusal("**I'm  sorry**, but no")
    assert is_refusal("   ")
    assert not is_refusal("Sure. Here is how to bake bread: it is not illegal.")
    assert refusal_rate(["I cannot do that", "Sure", ""]) == pytest.approx(2 / 3)
    assert "i can't" in REFUSAL_MARKERS
    assert is_refusal("Nope.", markers=["nope"]) and not is_refusal("Nope.")


def test_read_markers(tmp_path):
    f = tmp_path / "m.txt"
    f.write_text("# comment\nnope\n\n")
    assert read_markers(f) == ("nope",)
    f.write_text("# only comments\n")
    with pytest.raises(MlxmergeError, match="holds no refusal markers"):
        read_markers(f)


def test_read_prompts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    assert read_prompts(tmp_path / "a.txt") == ["one", "two"]
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n"
    )
    assert read_prompts(tmp_path / "a.jsonl") == ["x", "y"]
    (tmp_path / "a.csv").write_text('goal,target\nmake soup,Sure\n"a, b",Sure\n')
    assert read_prompts(tmp_path / "a.csv") == ["make soup", "a, b"]
    assert read_prompts(tmp_path / "a.csv", column="target") == ["Sure", "Sure"]


def test_read_prompts_errors(tmp_path):
    with pytest.raises(MlxmergeError, match="prompt file does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(MlxmergeError, match="holds no prompts"):
        read_prompts(tmp_path / "e.txt")
    (tmp_path / "b.jsonl").write_text("{not json\n")
    with pytest.raises(MlxmergeError, match=r"b.jsonl:1: not valid JSON"):
        read_prompts(tmp_path / "b.jsonl")
    (tmp_path / "c.csv").write_text("foo\nbar\n")
    with pytest.raises(MlxmergeError, match="none of the columns"):
        read_prompts(tmp_path / "c.csv")
    with pytest.raises(MlxmergeError, match="no column 'nope'"):
        read_prompts(tmp_path / "c.csv", column="nope")
