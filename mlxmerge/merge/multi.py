"""mergekit-multi recipes: several YAML documents, named intermediate merges used by later ones.

Each document is an ordinary recipe; one with ``name: X`` is merged first (in dependency order)
into a temporary folder beside the output, and any later reference to the model ``X`` reads that
folder. The document without a name (else the last one) is the final merge, written to the output.
The intermediates are deleted when the run ends, whether it succeeds or not.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

from mlxmerge.errors import RecipeError
from mlxmerge.io.output import check_output
from mlxmerge.merge.recipe import load_documents

_REF_KEYS = ("model", "base_model", "tokenizer_source", "source")


def is_multi_document(recipe) -> bool:
    """Whether ``recipe`` is a path to a file holding more than one YAML document."""
    if not isinstance(recipe, (str, Path)) or not Path(recipe).is_file():
        return False
    return len(load_documents(recipe)) > 1


def _refs(node) -> set[str]:
    found = set()
    if isinstance(node, dict):
        for k, v in node.items():
            if k in _REF_KEYS and isinstance(v, str):
                found.add(v)
            else:
                found |= _refs(v)
    elif isinstance(node, list):
        for v in node:
            found |= _refs(v)
    return found


def _substitute(node, paths: dict[str, str]):
    if isinstance(node, dict):
        return {
            k: paths.get(v, v) if k in _REF_KEYS and isinstance(v, str) else _substitute(v, paths)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_substitute(v, paths) for v in node]
    return node


def merge_order(docs: list[dict], where: str) -> tuple[list[int], int]:
    """Indices of the intermediate documents in dependency order, and the final document's index."""
    names = [d.get("name") if isinstance(d, dict) else None for d in docs]
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise RecipeError(f"{where}: document {i + 1} is not a recipe mapping")
    unnamed = [i for i, n in enumerate(names) if n is None]
    if len(unnamed) > 1:
        raise RecipeError(f"{where}: {len(unnamed)} documents have no name; only the final may")
    named = [n for n in names if n is not None]
    if len(set(named)) != len(named):
        raise RecipeError(f"{where}: two documents share a name ({', '.join(map(str, named))})")
    final = unnamed[0] if unnamed else len(docs) - 1
    index = {str(n): i for i, n in enumerate(names) if n is not None}
    deps = {i: {index[r] for r in _refs(d) if r in index} - {i} for i, d in enumerate(docs)}
    order: list[int] = []
    state: dict[int, str] = {}

    def visit(i: int) -> None:
        if state.get(i) == "done":
            return
        if state.get(i) == "open":
            raise RecipeError(
                f"{where}: the merges {names[i]!r} and its inputs depend on each other"
            )
        state[i] = "open"
        for j in sorted(deps[i]):
            visit(j)
        state[i] = "done"
        order.append(i)

    visit(final)
    return [i for i in order if i != final], final


def merge_multi(path: str | Path, output: str | Path, **merge_kwargs) -> Path:
    """Run every named merge ``path``'s final document needs, then the final one into ``output``.

    ``merge_kwargs`` go to each ``mlxmerge.merge.runner.merge`` call (``force`` and quantization
    only to the final).
    """
    from mlxmerge.merge.runner import merge

    docs = load_documents(path)
    order, final = merge_order(docs, str(path))
    output = check_output(output, force=merge_kwargs.get("force", False))  # before the first merge
    output.parent.mkdir(parents=True, exist_ok=True)
    # Named like a partial output, so that a killed run's leftovers go at the next run.
    prefix = f".{output.name}.partial-{os.getpid()}-intermediates-"
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=output.parent))
    try:
        paths: dict[str, str] = {}
        # Intermediates stay float: only the final model is quantized.
        final_only = ("force", "progress", "quantize_bits", "group_size", "gguf_type")
        inner = {k: v for k, v in merge_kwargs.items() if k not in final_only}
        if inner.get("layout") == "gguf":  # intermediates are read back: keep them exact
            inner["layout"] = "mlx"
        for i in order:
            doc = _substitute(copy.deepcopy(docs[i]), paths)
            name = str(docs[i]["name"])
            paths[name] = str(merge(doc, scratch / name, **inner))
        return merge(_substitute(copy.deepcopy(docs[final]), paths), output, **merge_kwargs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
