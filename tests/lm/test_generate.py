import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.errors import MlxmergeError
from mlxmerge.lm.chat import chat_tokens, post_instruction_tokens
from mlxmerge.lm.generate import generate, last_logits, pad_left

PROMPTS = ["Tell me a story", "red", "What is one plus two and why is it three?", "Hi there cat"]


def test_pad_left_puts_padding_first():
    tokens, padding = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert padding == [0, 2]


def test_chat_tokens_match_the_template_rendered_by_transformers(tiny_random):
    path, _, tokenizer = tiny_random
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path))
    text = hf.apply_chat_template(
        [{"role": "user", "content": "red"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<s><|im_start|>user\nred<|im_end|>\n<|im_start|>assistant\n"
    assert chat_tokens(tokenizer, ["red"]) == [hf.encode(text, add_special_tokens=False)]


def test_post_instruction_tokens_are_the_template_suffix(tiny_random):
    _, _, tokenizer = tiny_random
    ids = post_instruction_tokens(tokenizer)
    assert tokenizer.decode(ids) == "<|im_end|>\n<|im_start|>assistant\n"
    full = chat_tokens(tokenizer, ["red cat"])[0]
    assert full[-len(ids) :] == ids


def test_batched_left_padded_logits_equal_single_unpadded_runs(tiny_random):
    _, model, tokenizer = tiny_random
    lists = chat_tokens(tokenizer, PROMPTS)
    assert len({len(t) for t in lists}) > 1  # padding really happens
    batched = last_logits(model, lists, pad_id=0, batch_size=4)
    for i, t in enumerate(lists):
        single = model(mx.array([t]))[0, -1].astype(mx.float32)
        np.testing.assert_allclose(np.array(batched[i]), np.array(single), atol=1e-4, rtol=1e-4)


def test_batched_greedy_generation_equals_mlx_lm_generate(tiny_random):
    from mlx_lm import generate as lm_generate

    _, model, tokenizer = tiny_random
    ours = generate(model, tokenizer, PROMPTS, max_tokens=12, batch_size=4)
    for prompt, text in zip(PROMPTS, ours):
        ids = chat_tokens(tokenizer, [prompt])[0]
        ref = lm_generate(model, tokenizer, ids, max_tokens=12, verbose=False)
        assert text == ref


def test_no_chat_template_is_an_error(tiny_random):
    _, _, tokenizer = tiny_random

    class NoTemplate:
        chat_template = None

    with pytest.raises(MlxmergeError, match="no chat template; pass one with --template"):
        chat_tokens(NoTemplate(), ["x"])
    # An explicit template works even when the tokenizer has one.
    ids = chat_tokens(tokenizer, ["x"], chat_template="{{ messages[0]['content'] }}!")
    assert tokenizer.decode(ids[0]) == "x!"


def test_batch_size_must_be_positive(tiny_random):
    _, model, tokenizer = tiny_random
    with pytest.raises(MlxmergeError, match="batch size must be at least 1"):
        last_logits(model, chat_tokens(tokenizer, ["x"]), batch_size=0)


def test_shared_prefix_logits_equal_single_unpadded_runs(tiny_random):
    from mlxmerge.lm.generate import prompt_logits, shared_prefix_length

    _, model, tokenizer = tiny_random
    lists = chat_tokens(tokenizer, PROMPTS, system="You are a helpful assistant named Tiny.")
    p = shared_prefix_length(lists)
    assert p >= 8 and all(t[:p] == lists[0][:p] for t in lists)
    assert shared_prefix_length([[1, 2, 3], [1, 2]]) == 1  # one token of each kept
    out = prompt_logits(model, lists, pad_id=0, batch_size=3)
    for i, t in enumerate(lists):
        single = model(mx.array([t]))[0, -1].astype(mx.float32)
        np.testing.assert_allclose(np.array(out[i]), np.array(single), atol=1e-4, rtol=1e-4)
