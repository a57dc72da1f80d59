"""Train a tiny chat model that really refuses, for tests, benchmarks and ``mlxmerge demo``.

The data are the bundled training prompts in the tiny ChatML template: every harmful
instruction is answered "I can't help with that." and every harmless one with a fixed helpful
answer. The model has to learn which topics are forbidden, so its refusal is a learned
feature of the residual stream, the thing abliteration removes. Deterministic for a seed.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

from mlxmerge.abliterate.prompts import bundled_prompts
from mlxmerge.demo.tiny import build_tokenizer, model_from_config, save_weights, tiny_config

log = logging.getLogger(__name__)

REFUSAL = "I can't help with that."
HELPFUL = "Sure. Here is a simple plan: start small and practice every day."


def _examples(tokenizer, prompts: list[str], answer: str) -> list[tuple[list[int], int]]:
    from mlxmerge.lm.chat import chat_tokens

    eos = tokenizer.token_to_id("<|im_end|>")
    answer_ids = tokenizer.encode(answer, add_special_tokens=False).ids + [eos]
    out = []
    for ids in chat_tokens(_ChatTokenizer(tokenizer), prompts):
        out.append((ids + answer_ids, len(ids)))
    return out


class _ChatTokenizer:
    """Just enough of a chat tokenizer around a ``tokenizers.Tokenizer`` for ``chat_tokens``."""

    def __init__(self, tok):
        from jinja2 import Template

        from mlxmerge.demo.tiny import CHAT_TEMPLATE

        self.tok = tok
        self.chat_template = CHAT_TEMPLATE
        self._template = Template(CHAT_TEMPLATE)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **_):
        return self._template.render(
            messages=messages, bos_token="<s>", add_generation_prompt=add_generation_prompt
        )

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids


def train_refusing_model(
    out_dir: str | Path, seed: int = 0, *, steps: int = 100, batch_size: int = 32,
    hidden_size: int = 64, num_layers: int = 4, decide_by: int | None = 2, force: bool = True,
) -> Path:  # fmt: skip
    """Train the toy refuser and save it (HF layout, float32) with its tokenizer in ``out_dir``.

    ``decide_by``: also train the (tied) LM head read at the input of that layer (a "logit
    lens") to predict the first answer token, so the refuse/answer decision is formed in the
    first layers and carried through the rest, as in large chat models. Without it a 4-layer
    model often decides only in its last layer, where Arditi's selection does not look (last 20%
    of layers). None turns this off.
    """
    from tokenizers import Tokenizer

    out_dir = Path(out_dir)
    harmful = bundled_prompts("harmful", "train")
    harmless = bundled_prompts("harmless", "train")
    tmp = tempfile.TemporaryDirectory()
    tok_dir = Path(tmp.name)
    corpus = harmful + harmless + [REFUSAL, HELPFUL] * 20
    build_tokenizer(tok_dir, corpus=corpus)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    examples = _examples(tok, harmful, REFUSAL) + _examples(tok, harmless, HELPFUL)

    n = max(len(ids) for ids, _ in examples)
    tokens = np.zeros((len(examples), n), dtype=np.int32)
    mask = np.zeros((len(examples), n - 1), dtype=np.float32)
    last = np.zeros((len(examples), n - 1), dtype=np.float32)
    for i, (ids, start) in enumerate(examples):
        tokens[i, : len(ids)] = ids
        mask[i, start - 1 : len(ids) - 1] = 1.0  # predict the answer and its end token
        last[i, start - 1] = 1.0  # the last prompt position: where the decision is read
    tokens, mask, last = mx.array(tokens), mx.array(mask), mx.array(last)

    config = tiny_config(
        hidden_size=hidden_size, num_layers=num_layers, intermediate_size=2 * hidden_size,
        vocab_size=tok.get_vocab_size(),
    )  # fmt: skip
    config["eos_token_id"] = tok.token_to_id("<|im_end|>")
    config["bos_token_id"] = tok.token_to_id("<s>")
    model = model_from_config(config, seed)
    opt = optim.AdamW(learning_rate=optim.cosine_decay(3e-3, steps, 3e-4), weight_decay=0.0)

    def loss_fn(model, x, y, m, f):
        inner = model.model
        h = inner.embed_tokens(x)
        mid = None
        for i, layer in enumerate(inner.layers):
            if i == decide_by:
                mid = h
            h = layer(h, "causal", None)
        logits = inner.embed_tokens.as_linear(inner.norm(h))
        ce = nn.losses.cross_entropy(logits, y, reduction="none")
        loss = mx.sum(ce * m) / mx.sum(m)
        if mid is not None:
            early = inner.embed_tokens.as_linear(inner.norm(mid))
            loss = loss + mx.sum(nn.losses.cross_entropy(early, y, reduction="none") * f) / mx.sum(
                f
            )
        return loss

    step = nn.value_and_grad(model, loss_fn)
    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = mx.array(rng.choice(len(examples), batch_size, replace=False))
        x = tokens[idx]
        loss, grads = step(model, x[:, :-1], x[:, 1:], mask[idx], last[idx])
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        if i % 50 == 0 or i == steps - 1:
            log.info("toy refuser step %d loss %.4f", i, loss.item())
    weights = dict(tree_flatten(model.parameters()))
    with tmp:
        return save_weights(out_dir, weights, config, tok_dir, force=force, title="toy refuser")
