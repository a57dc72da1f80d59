"""Run mergekit 0.1.5 on every corpus recipe once and keep what it wrote as golden files.

Runs in the side venv that has mergekit (never imported by the tests):

    /work/venv-ref/bin/python tests/merge/recipes/generate_golden.py [NAME ... | --missing]

Each recipe runs with float32 compute (``fp32_compute``: mlxmerge's compute dtype) and otherwise
unchanged. For each ``NN_name.yml`` it writes ``golden/NN_name.safetensors`` (every output tensor, in the
dtype mergekit wrote) and ``golden/NN_name.json`` (config fields, the tokenizer's vocabulary and
added tokens, the chat template, or mergekit's error). CPU only, ``--random-seed 0`` and
``PYTHONHASHSEED=0`` (mergekit orders its model set by hash). ``model+lora`` references are fused
by mergekit through peft's ``merge_and_unload`` into a temporary ``--lora-merge-cache``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
CONFIG_KEYS = ("vocab_size", "num_hidden_layers", "tie_word_embeddings", "torch_dtype", "dtype")


def run_mergekit(recipe: Path, out: Path) -> str | None:
    """Run mergekit (in this process; mergekit-multi as a command); the error line, or None."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    text = fp32_compute(recipe.read_text())
    lora_cache = out.parent / "lora_cache"  # where mergekit writes each model+lora it fuses (peft)
    if "\n---" in text:
        recipe = HERE / f"_fp32_{recipe.name}"  # mergekit-multi reads a file
        recipe.write_text(text)
        inter = out.parent / "intermediates"
        cmd = [str(BIN / "mergekit-multi"), str(recipe), "--intermediate-dir", str(inter),
               "--out-path", str(out), "--random-seed", "0", "--no-write-model-card", "--quiet",
               "--lora-merge-cache", str(lora_cache)]  # fmt: skip
        try:
            r = subprocess.run(cmd, check=False, cwd=HERE, env=dict(os.environ),
                               capture_output=True, text=True, timeout=900)  # fmt: skip
        finally:
            recipe.unlink()
        if r.returncode != 0:
            lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
            return lines[-1] if lines else f"exit {r.returncode}"
        return None
    options = MergeOptions(random_seed=0, copy_tokenizer=True, write_model_card=False, quiet=True,
                           lora_merge_cache=str(lora_cache))  # fmt: skip
    options.apply_global_options()
    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(text))
        run_merge(config, str(out), options=options, config_source=text)
    except Exception as e:  # noqa: BLE001 (any mergekit failure is recorded, not fatal)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def fp32_compute(text: str) -> str:
    """The recipe with ``dtype: float32`` and ``out_dtype`` its output dtype (bf16 by default).

    mergekit computes in the recipe's ``dtype``; mlxmerge always in float32, casting once at the end
    (a documented difference). Running mergekit the same way isolates every other difference, so
    the tensors can be compared to one bf16 ulp. Nothing else in the recipe changes.
    """
    import yaml

    docs = []
    for doc in yaml.safe_load_all(text):
        out = doc.get("out_dtype") or doc.get("dtype") or "bfloat16"
        docs.append({**doc, "dtype": "float32", "out_dtype": out})
    return yaml.safe_dump_all(docs, sort_keys=False)


def summarize(out: Path) -> dict:
    from transformers import AutoTokenizer

    config = json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    template = tok.chat_template
    return {
        "config": {k: config[k] for k in CONFIG_KEYS if k in config},
        "vocab": tok.get_vocab(),
        "added_tokens": sorted(t.content for t in tok.added_tokens_decoder.values()),
        "chat_template": template,
        "files": sorted(p.name for p in out.iterdir()),
    }


def collect_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def main(names: list[str]) -> None:
    from safetensors.torch import save_file

    golden = HERE / "golden"
    golden.mkdir(exist_ok=True)
    # moe_*: recipes whose golden documents a difference (tests/merge/test_moe_statistics.py)
    recipes = sorted(HERE.glob("[0-9]*.yml")) + sorted(HERE.glob("moe_*.yml"))
    if names == ["--missing"]:
        recipes = [r for r in recipes if not (golden / f"{r.stem}.json").exists()]
    elif names:
        recipes = [r for r in recipes if r.stem in names]
    for recipe in recipes:
        text = recipe.read_text()
        refused = "# expect: refuse" in text
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "out"
            err = run_mergekit(recipe, out)
            info: dict = {"recipe": recipe.name}
            if err is not None:
                info["mergekit_error"] = err
            else:
                info.update(summarize(out))
                tensors = {k: v.contiguous() for k, v in collect_tensors(out).items()}
                info["shapes"] = {k: list(v.shape) for k, v in tensors.items()}
                # mlxmerge refuses some; DARE/DELLA masks come from another RNG: no values kept
                if not refused and not RANDOM.intersection(
                    re.findall(r"merge_method: (\w+)", text)
                ):
                    save_file(tensors, str(golden / f"{recipe.stem}.safetensors"))
            (golden / f"{recipe.stem}.json").write_text(json.dumps(info, indent=1, sort_keys=True))
            shutil.rmtree(out, ignore_errors=True)
        print(recipe.stem, "error: " + err if err else "ok", flush=True)


if __name__ == "__main__":
    # mergekit orders its model set by hash, and never needs the hub here
    if os.environ.get("PYTHONHASHSEED") != "0" or os.environ.get("HF_HUB_OFFLINE") != "1":
        env = dict(os.environ, PYTHONHASHSEED="0", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    os.chdir(HERE)  # the recipes name the models as models/<name>
    main(sys.argv[1:])
