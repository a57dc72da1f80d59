"""The one rule for plain-text corpora (``eval`` perplexity tasks, ``sae`` data, ``refusals --text``).

Documents are separated by blank lines, and the newlines inside a document are kept. A file with
no blank line at all holds one document per non-empty line (the usual dump of short texts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlxmerge.errors import MlxmergeError
from mlxmerge.io.text import read_text

__all__ = ["read_documents", "split_documents"]

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def split_documents(text: str) -> list[str]:
    """The documents of a plain-text file's content, stripped, empty ones dropped."""
    text = text.replace("\r\n", "\n")
    parts = (
        _BLANK_LINE.split(text.strip()) if _BLANK_LINE.search(text.strip()) else text.split("\n")
    )
    return [d.strip() for d in parts if d.strip()]


def read_documents(
    path: str | Path, error: type[MlxmergeError] = MlxmergeError, what: str = "text file"
) -> list[str]:
    """Documents of a ``.jsonl`` (its ``text`` field, one row each) or any other text file
    (UTF-8, a BOM dropped); ``error`` is raised, in one line, for a file that is not that."""
    path = Path(path).expanduser()
    text = read_text(path, what, error)
    if path.suffix.lower() != ".jsonl":
        docs = split_documents(text)
    else:
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise error(f"{path}:{n}: not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise error(f"{path}:{n}: each line needs a string field 'text'")
            if row["text"].strip():
                docs.append(row["text"])
    if not docs:
        raise error(f"{path}: no text found (empty {what})")
    return docs
