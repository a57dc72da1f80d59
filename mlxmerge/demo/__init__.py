"""``mlxmerge demo`` and its fixtures: tiny models built locally, a toy refuser, toy SAE data.

Not part of the library's import path: only the demo, the tests and the benchmarks import it.
``run_demo`` trains a small refusing model, abliterates it, merges the two and trains an SAE.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def generate_text(model_path: Path, prompt: str, max_tokens: int = 12) -> str:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(model_path))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return mlx_lm.generate(model, tokenizer, prompt=text, max_tokens=max_tokens, verbose=False)


def abliteration_demo(out: Path, seed: int = 0) -> dict:
    """Train a tiny chat model that refuses a set of topics, then abliterate it."""
    from mlxmerge.abliterate import abliterate
    from mlxmerge.demo.toy_refuser import train_refusing_model

    refuser = train_refusing_model(out / "refuser", seed=seed)
    report = abliterate(refuser, out / "abliterated", batch_size=32, force=True)
    before, after = report["before"], report["after"]
    return {
        "refusing model": str(refuser),
        "abliterated model": str(out / "abliterated"),
        "direction": report["direction"].get("why", ""),
        "refusal rate on held-out harmful prompts": f"{before['refusal_rate']:.0%} -> {after['refusal_rate']:.0%}",
        "first-token KL on harmless prompts": f"{after['kl']:.4f}",
        "harmless answers unchanged": f"{after['same_harmless_answers']:.0%}",
    }


def sae_demo(model: Path, out: Path, seed: int = 0) -> dict:
    """Collect activations of ``model`` at its middle layer and train a small TopK SAE."""
    from mlxmerge.sae.pipeline import quick_sae

    layer = 1
    metrics = quick_sae(model, layer, out / "sae", seed=seed, force=True)
    keys = ("fvu", "l0", "dead_fraction")
    return {"output (SAELens format)": str(out / "sae"), "layer": layer,
            **{k: round(float(metrics[k]), 4) for k in keys if k in metrics}}  # fmt: skip


def run_demo(out: str | Path = "mlxmerge-demo", seed: int = 0, progress=None) -> dict:
    """Train a small refusing chat model, abliterate it, SLERP the two, train an SAE; report."""
    from mlxmerge.abliterate.prompts import bundled_prompts
    from mlxmerge.merge.runner import merge

    say = progress or (lambda _msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"folder": str(out.resolve())}
    say("training a small Llama-style chat model that refuses a set of topics (about a minute)")
    report["abliteration"] = abliteration_demo(out, seed)
    refuser, abliterated = out / "refuser", out / "abliterated"

    say("merging the refusing and the abliterated model with SLERP")
    recipe = {
        "merge_method": "slerp",
        "base_model": str(refuser),
        "models": [{"model": str(refuser)}, {"model": str(abliterated)}],
        "parameters": {"t": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]},
        "dtype": "bfloat16",
    }
    merged = merge(recipe, out / "slerp-merge", force=True)
    harmful = bundled_prompts("harmful", "test")[0]
    harmless = bundled_prompts("harmless", "test")[0]
    report["merge"] = {
        "method": "slerp (t: mlp 0→1 over the layers, else 0.5)",
        "output": str(merged),
        f"mlx_lm.generate, harmful prompt {harmful!r}": generate_text(merged, harmful),
        f"mlx_lm.generate, harmless prompt {harmless!r}": generate_text(merged, harmless),
    }
    say("training a sparse autoencoder on the refusing model's residual stream")
    report["sae"] = sae_demo(refuser, out, seed)
    return report
