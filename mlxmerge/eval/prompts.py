"""Read prompt lists from user files: ``.txt`` (one per line), ``.jsonl`` or ``.csv`` (a column)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mlxmerge.errors import MlxmergeError
from mlxmerge.io.text import read_text

# Column names tried, in order, when the user names none (AdvBench uses "goal", mlabonne "text").
DEFAULT_COLUMNS = ("prompt", "text", "instruction", "goal", "question")


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Non-empty prompts from a .txt, .jsonl or .csv file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise MlxmergeError(f"{path}: prompt file does not exist")
    suffix = path.suffix.lower()
    text = read_text(path, "prompt file")
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MlxmergeError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        prompts = [_pick(row, column, path) for row in rows]
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        prompts = [_pick(row, column, path) for row in reader]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise MlxmergeError(f"{path}: holds no prompts")
    return prompts


def _pick(row, column: str | None, path: Path) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise MlxmergeError(f"{path}: each row must be a JSON object or a string")
    if column is not None:
        if column not in row:
            raise MlxmergeError(f"{path}: no column {column!r}; columns are {sorted(row)}")
        return str(row[column])
    for name in DEFAULT_COLUMNS:
        if name in row:
            return str(row[name])
    raise MlxmergeError(
        f"{path}: none of the columns {list(DEFAULT_COLUMNS)} found (has {sorted(row)}); name one"
    )
