"""The embedded default job: build small models locally, merge them, run the result."""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxmerge.tiny import build_tokenizer, model_from_config, save_weights, tiny_config

log = logging.getLogger(__name__)


def build_family(out: Path, seed: int = 0, spread: float = 0.02) -> dict[str, Path]:
    """A base model and two 'fine-tunes' of it (base + small seeded perturbations)."""
    tok = build_tokenizer(out / "tokenizer")
    config = tiny_config(hidden_size=64, num_layers=4)
    base = dict(tree_flatten(model_from_config(config, seed).parameters()))
    paths = {"base": save_weights(out / "base", base, config, tok, force=True, title="demo base")}
    for i, name in enumerate(("model_a", "model_b"), start=1):
        keys = mx.random.split(mx.random.key(seed * 1000 + i), len(base))
        tuned = {}
        for j, (k, v) in enumerate(sorted(base.items())):
            noise = mx.random.normal(v.shape, key=keys[j])
            tuned[k] = v + spread * mx.abs(v).mean() * noise
        paths[name] = save_weights(out / name, tuned, config, tok, force=True, title=f"demo {name}")
    return paths


def generate_text(model_path: Path, prompt: str, max_tokens: int = 12) -> str:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(model_path))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return mlx_lm.generate(model, tokenizer, prompt=text, max_tokens=max_tokens, verbose=False)


def run_demo(out: str | Path = "mlxmerge-demo", seed: int = 0) -> dict:
    """Build, merge (SLERP), load with mlx-lm and generate; return what happened."""
    from mlxmerge.merge.runner import merge

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"folder": str(out.resolve())}
    paths = build_family(out, seed)
    report["models"] = {k: str(v) for k, v in paths.items()}
    recipe = {
        "merge_method": "slerp",
        "base_model": str(paths["model_a"]),
        "models": [{"model": str(paths["model_a"])}, {"model": str(paths["model_b"])}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]},
        "dtype": "bfloat16",
    }
    merged = merge(recipe, out / "slerp-merge", force=True)
    report["merge"] = {"method": "slerp", "output": str(merged)}
    report["merge"]["generation"] = generate_text(merged, "Tell me a story about a cat.")
    return report
