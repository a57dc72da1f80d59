"""Output-vocabulary rows (mergekit's PermutedVocabulary rules) against hand-worked cases."""

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.errors import RecipeError
from mlxmerge.merge.recipe import TokenizerSpec, TokenSource
from mlxmerge.merge.vocab import Vocabulary, permute_rows


def vocab(tokens, perms, spec=None, size=None, originals=None, base_model="base"):
    spec = spec or TokenizerSpec("union")
    return Vocabulary(
        tokenizer=None,
        tokens={t: i for i, t in enumerate(tokens)},
        size=size or len(tokens),
        permutations={m: np.array(p) for m, p in perms.items()},
        original_vocabs=originals or {},
        spec=spec,
        base="base",
        base_model=base_model,
    )


def rows(*values):
    return mx.array(np.array(values, np.float32)[:, None] * np.ones((1, 2), np.float32))


def test_missing_tokens_follow_mergekits_order_of_fallbacks():
    # output tokens: a (all have it), b (only x), c (base and y), d (x and y), e (nobody)
    v = vocab(
        list("abcde"),
        {"base": [0, -1, 1, -1, -1], "x": [0, 1, -1, 2, -1], "y": [1, -1, 0, 2, -1]},
    )
    got = permute_rows(v, {"base": rows(10, 11), "x": rows(20, 21, 22), "y": rows(31, 30, 32)})
    col = {m: np.array(a)[:, 0].tolist() for m, a in got.items()}
    # b: only x has it -> x's row; c: the base's row; d: mean of x and y (base lacks it); e: zeros
    assert col["base"] == [10, 21, 11, 27, 0]
    assert col["x"] == [20, 21, 11, 22, 0]
    assert col["y"] == [30, 21, 31, 32, 0]


def test_token_sources_force_and_padding():
    spec = TokenizerSpec(
        "union",
        tokens={
            "a": TokenSource("model", "x", force=True),  # every model takes x's row for a
            "z": TokenSource("model_token", "base", token="b"),  # base's row of token b
        },
        pad_to_multiple_of=4,
    )
    v = vocab(
        ["a", "b", "z"],
        {"base": [0, 1, -1], "x": [1, 0, -1]},
        spec,
        size=4,
        originals={"base": {"a": 0, "b": 1}, "x": {"b": 0, "a": 1}},
    )
    got = permute_rows(v, {"base": rows(1, 2), "x": rows(5, 6)})
    base = np.array(got["base"])[:, 0]
    x = np.array(got["x"])[:, 0]
    np.testing.assert_allclose(base, [6, 2, 2, np.mean([6, 2, 2])])  # pad row: the mean row
    np.testing.assert_allclose(x, [6, 5, 2, np.mean([6, 5, 2])])


def test_a_source_model_this_tensor_does_not_read_is_an_error():
    spec = TokenizerSpec("union", tokens={"b": TokenSource("model", "other")})
    v = vocab(["a", "b"], {"base": [0, -1], "x": [0, -1]}, spec)
    with pytest.raises(RecipeError, match="other"):
        permute_rows(v, {"base": rows(1), "x": rows(2)})


def test_without_a_base_model_shared_tokens_are_averaged():
    """mergekit's PermutedVocabulary has no base then: a token two of three models have is their
    mean in the third, even for the model whose tokenizer the output started from."""
    v = vocab(["a", "b"], {"base": [0, 1], "x": [0, 1], "y": [0, -1]}, base_model=None)
    got = permute_rows(v, {"base": rows(1, 2), "x": rows(3, 8), "y": rows(5)})
    assert np.array(got["y"])[:, 0].tolist() == [5, 5]
