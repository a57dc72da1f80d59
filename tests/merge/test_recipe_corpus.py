"""Public mergekit recipes (tests/merge/recipes, sources in each file) give mergekit 0.1.5's result.

The golden files were written once by mergekit 0.1.5 (``recipes/generate_golden.py``, run in a
side venv) from the committed tiny models. Every output tensor must match to one bf16 ulp; the
config's vocabulary size, layer count and tying, the tokenizer's vocabulary and added tokens and
the chat template must be equal. Random methods (DARE, DELLA) cannot match mergekit's torch RNG:
for them only names, shapes and the tokenizer are compared. A recipe marked ``# expect: refuse KEY``
must fail with a one-line error naming KEY.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.errors import RecipeError
from mlxmerge.merge.recipe import load_documents
from mlxmerge.merge.registry import get_method
from mlxmerge.merge.runner import merge

HERE = Path(__file__).parent / "recipes"
RECIPES = sorted(HERE.glob("[0-9]*.yml"))


def _tensors(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(f)).items()})
    return out


def _bf16_ulp(x: np.ndarray) -> np.ndarray:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    mag = np.maximum(np.abs(x), np.finfo(np.float32).tiny)
    return np.exp2(np.floor(np.log2(mag)) - 7)


def _is_random(recipe: Path) -> bool:
    return any(get_method(d["merge_method"]).random for d in load_documents(recipe))


def test_corpus_is_large_enough():
    refused = [r for r in RECIPES if "# expect: refuse" in r.read_text()]
    assert len(RECIPES) >= 30 and len(refused) < len(RECIPES) // 4
    for r in RECIPES:
        assert r.read_text().startswith("# source: "), r.name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_gives_mergekits_result(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(HERE)  # the recipes name the models as models/<name>
    expect = re.search(r"# expect: refuse (\S+)", recipe.read_text())
    if expect:
        with pytest.raises(RecipeError, match=expect.group(1)) as err:
            merge(recipe.name, tmp_path / "out", layout="hf")
        assert "\n" not in str(err.value)
        return
    golden = json.loads((HERE / "golden" / f"{recipe.stem}.json").read_text())
    assert "mergekit_error" not in golden, golden.get("mergekit_error")
    out = merge(recipe.name, tmp_path / "out", layout="hf")
    assert not list(tmp_path.glob(".out.*"))  # mergekit-multi scratch, lock: nothing left

    got = _tensors(out)
    if _is_random(recipe):  # DARE/DELLA: mergekit's masks come from torch's RNG; shapes only
        want = {k: np.zeros(v, np.float32) for k, v in golden["shapes"].items()}
    else:
        want = {k: np.array(v.astype(mx.float32))
                for k, v in mx.load(str(HERE / "golden" / f"{recipe.stem}.safetensors")).items()}  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    tied = config.get("tie_word_embeddings", False)
    if tied and "lm_head.weight" in want:  # mergekit kept a tied model's redundant head copy
        head = want.pop("lm_head.weight")
        np.testing.assert_array_equal(head, want["model.embed_tokens.weight"])
    assert sorted(got) == sorted(want)
    for k in ("vocab_size", "num_hidden_layers"):
        assert config[k] == golden["config"][k], k
    if not _is_random(recipe):
        for name, w in want.items():
            g = got[name]
            assert g.shape == w.shape, name
            # one bf16 ulp, plus float32-level slack where a result cancels to ~0
            tol = _bf16_ulp(np.maximum(np.abs(g), np.abs(w))) + 2.0**-20 * np.abs(w).max()
            bad = np.abs(g - w) > tol
            assert not bad.any(), (
                f"{name}: {bad.sum()} of {bad.size} entries differ by more than 1 bf16 ulp "
                f"(max |Δ| {np.abs(g - w).max():.3g})"
            )
    else:
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.get_vocab() == golden["vocab"]
    assert sorted(t.content for t in tok.added_tokens_decoder.values()) == golden["added_tokens"]
    assert tok.chat_template == golden["chat_template"]
    assert got["model.embed_tokens.weight"].shape[0] >= len(golden["vocab"])
