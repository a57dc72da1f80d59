"""Chat templates: mergekit's built-in ones by name, and the one a model folder carries."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

from mlxmerge.errors import RecipeError
from mlxmerge.io.text import read_text

BUILTIN = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def builtin_template(name: str) -> str:
    """The Jinja text of a built-in template (the same text mergekit 0.1.5 ships)."""
    if name not in BUILTIN:
        raise RecipeError(f"unknown chat template {name!r}; built-in: {', '.join(BUILTIN)}")
    return (resources.files("mlxmerge") / "data" / "chat_templates" / f"{name}.jinja").read_text(
        encoding="utf-8"
    )


def folder_template(folder: Path) -> str | None:
    """The template a tokenizer in ``folder`` uses, as transformers reads it (default one if named)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return read_text(jinja, "chat template")
    for fname in ("tokenizer_config.json", "chat_template.json"):
        path = folder / fname
        if not path.is_file():
            continue
        value = json.loads(read_text(path)).get("chat_template")
        if isinstance(value, list):  # [{name, template}, ...]: transformers keeps "default"
            value = {e.get("name"): e.get("template") for e in value}.get("default")
        if value:
            return value
    return None


def resolve_template(value: str | None, folders: list[Path]) -> str | None:
    """The template text a recipe's ``chat_template`` asks for (None: keep the donor's).

    'auto' is the most common template among ``folders`` (ties: the first listed; mergekit's
    order there is a set's), a built-in name gives its text, anything else is Jinja text itself.
    """
    if value is None:
        return None
    if value == "auto":
        found = [t.strip() for t in (folder_template(f) for f in folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in BUILTIN:
        return builtin_template(value)
    return value
