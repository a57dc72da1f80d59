"""Tiny Llama-style models and a byte-level BPE tokenizer, built locally and deterministically.

The demo, the tests and the benchmarks use these: no network, no hub. The models are real
mlx-lm architectures (so ``mlx_lm.load`` and ``mlx_lm.generate`` run them) with small configs.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from mlxmerge.io.model_folder import ModelCard, Quantization, write_model

SPECIAL_TOKENS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = [
    "the",
    "a",
    "model",
    "merge",
    "layer",
    "weight",
    "tensor",
    "sparse",
    "feature",
    "direction",
    "refusal",
    "help",
    "please",
    "write",
    "story",
    "about",
    "cat",
    "dog",
    "sun",
    "moon",
    "river",
    "tree",
    "house",
    "water",
    "fire",
    "light",
    "dark",
    "small",
    "large",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "add",
    "plus",
    "minus",
    "equals",
    "answer",
    "question",
    "why",
    "how",
    "what",
    "when",
    "where",
    "who",
    "can",
    "you",
    "tell",
    "me",
    "explain",
    "make",
    "give",
    "list",
    "name",
    "time",
    "day",
    "night",
    "red",
    "green",
    "blue",
    "happy",
    "sad",
    "quick",
    "slow",
    "old",
    "new",
    "good",
    "bad",
    "first",
    "last",
    "open",
    "close",
    "read",
    "learn",
]


def _corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words).capitalize() + ".")
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{a} + {b} = {a + b}")
    return lines


def build_tokenizer(
    folder: str | Path, *, vocab_size: int = 512, corpus: list[str] | None = None
) -> Path:
    """Train a byte-level BPE tokenizer with a ChatML template and save it HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or _corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok.save(str(folder / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def tiny_config(
    *, model_type: str = "llama", vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 4,
    intermediate_size: int = 128, num_heads: int = 4, num_kv_heads: int = 2, tie: bool = True,
) -> dict:  # fmt: skip
    """A config.json for a small model of a real mlx-lm architecture."""
    arch = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mistral": "MistralForCausalLM",
    }
    return {
        "architectures": [arch.get(model_type, "LlamaForCausalLM")],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 3,
        "torch_dtype": "float32",
    }


def model_from_config(config: dict, seed: int = 0) -> nn.Module:
    """Instantiate the mlx-lm model class for ``config`` with seeded random weights."""
    from mlx_lm.utils import MODEL_REMAPPING

    model_type = MODEL_REMAPPING.get(config["model_type"], config["model_type"])
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    args = module.ModelArgs.from_dict(config)
    mx.random.seed(seed)
    model = module.Model(args)
    mx.eval(model.parameters())
    return model


def save_weights(
    folder: str | Path, weights: dict[str, mx.array], config: dict, tokenizer_dir: str | Path,
    *, dtype: mx.Dtype = mx.float32, layout: str = "hf", quantize: Quantization | None = None,
    shard_size: int | None = None, force: bool = False, title: str = "tiny model",
) -> Path:  # fmt: skip
    """Write ``weights`` as a model folder through the streaming writer."""
    if config.get("tie_word_embeddings", True):
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    names = sorted(weights)
    plan = [(n, tuple(weights[n].shape)) for n in names]
    total = sum(weights[n].nbytes for n in names)
    return write_model(
        folder, plan, lambda n: weights[n], config=config, tokenizer_source=Path(tokenizer_dir),
        card=ModelCard(title), dtype=dtype, layout=layout, quantize=quantize,
        shard_size=shard_size or max(total, 1), force=force,
    )  # fmt: skip


def build_model(
    folder: str | Path, tokenizer_dir: str | Path, *, seed: int = 0, dtype: mx.Dtype = mx.float32,
    layout: str = "hf", quantize: Quantization | None = None, shard_size: int | None = None,
    force: bool = False, **config_kwargs,
) -> Path:  # fmt: skip
    """Build a randomly initialised tiny model folder that ``mlx_lm.load`` opens."""
    config = tiny_config(**config_kwargs)
    model = model_from_config(config, seed)
    weights = dict(tree_flatten(model.parameters()))
    return save_weights(
        folder, weights, config, tokenizer_dir, dtype=dtype, layout=layout, quantize=quantize,
        shard_size=shard_size, force=force, title=f"tiny {config['model_type']} (seed {seed})",
    )  # fmt: skip
