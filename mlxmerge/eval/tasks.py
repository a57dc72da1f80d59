"""Task files for ``mlxmerge eval``: plain text, multiple choice and generation.

* plain text (any extension but ``.jsonl``): documents as ``mlxmerge.io.documents`` splits them
  (blank lines; one per line when the file has none), scored by perplexity.
* ``.jsonl`` with ``prompt``, ``choices`` (list of strings) and ``answer`` (index): multiple choice,
  each choice scored by the log-likelihood of ``prompt + choice``.
* ``.jsonl`` with ``prompt`` and ``answer`` (string or number): generation, exact match of the
  extracted answer.

Every problem with a file raises :class:`TaskError` naming the file and the line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlxmerge.errors import MlxmergeError
from mlxmerge.io.documents import split_documents
from mlxmerge.io.text import read_text

PERPLEXITY, CHOICE, GENERATION = "perplexity", "choice", "generation"
KINDS = (PERPLEXITY, CHOICE, GENERATION)


class TaskError(MlxmergeError):
    """A task file is missing, empty or malformed."""


@dataclass
class ChoiceItem:
    prompt: str
    choices: list[str]
    answer: int


@dataclass
class GenerationItem:
    prompt: str
    answer: str


@dataclass
class Task:
    """One evaluation task read from a file."""

    name: str
    """The file's stem; names the task in tables and JSON."""
    kind: str
    """'perplexity', 'choice' or 'generation'."""
    path: Path
    documents: list[str] = field(default_factory=list)
    """Perplexity: the texts (``split_documents`` of the file)."""
    items: list = field(default_factory=list)
    """Choice / generation: the items, in file order."""

    def __len__(self) -> int:
        return len(self.documents) if self.kind == PERPLEXITY else len(self.items)

    @property
    def higher_is_better(self) -> bool:
        return self.kind != PERPLEXITY

    def split(self, fraction: float) -> tuple[Task, Task]:
        """The first ``fraction`` of the items (or documents) and the rest, as two tasks."""
        rows = self.documents if self.kind == PERPLEXITY else self.items
        k = max(1, min(len(rows) - 1, round(len(rows) * fraction)))
        parts = []
        for suffix, sub in (("a", rows[:k]), ("b", rows[k:])):
            t = Task(f"{self.name}[{suffix}]", self.kind, self.path)
            if self.kind == PERPLEXITY:
                t.documents = list(sub)
            else:
                t.items = list(sub)
            parts.append(t)
        return parts[0], parts[1]


def load_task(path: str | Path, kind: str | None = None) -> Task:
    """Read a task file; ``kind`` forces a type, otherwise the extension and fields decide."""
    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise TaskError(f"unknown task kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    text = read_text(path, "task file", TaskError)
    if not text.strip():
        raise TaskError(f"{path}: the file is empty")
    if kind is None:
        kind = PERPLEXITY if path.suffix.lower() != ".jsonl" else None
    if kind == PERPLEXITY:
        docs = split_documents(text)
        return Task(path.stem, PERPLEXITY, path, documents=docs)
    return _load_jsonl(path, text, kind)


def _load_jsonl(path: Path, text: str, kind: str | None) -> Task:
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TaskError(f"{where}: expected a JSON object with prompt and answer")
        if kind is None:
            kind = CHOICE if "choices" in row else GENERATION
        items.append(_choice_item(row, where) if kind == CHOICE else _generation_item(row, where))
    return Task(path.stem, kind, path, items=items)


def _field(row: dict, key: str, where: str):
    if key not in row:
        raise TaskError(
            f"{where}: missing field {key!r} (has {', '.join(map(repr, row)) or 'none'})"
        )
    return row[key]


def _choice_item(row: dict, where: str) -> ChoiceItem:
    prompt = _field(row, "prompt", where)
    choices = _field(row, "choices", where)
    answer = _field(row, "answer", where)
    if not isinstance(prompt, str):
        raise TaskError(f"{where}: 'prompt' must be a string")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) for c in choices)
    ):
        raise TaskError(f"{where}: 'choices' must be a list of at least two strings")
    if any(not c for c in choices):
        raise TaskError(f"{where}: a choice is an empty string; it has no tokens to score")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise TaskError(f"{where}: 'answer' must be the index of the right choice (an integer)")
    if not 0 <= answer < len(choices):
        raise TaskError(
            f"{where}: answer index {answer} is out of range for {len(choices)} choices (0..{len(choices) - 1})"
        )
    return ChoiceItem(prompt, choices, answer)


def _generation_item(row: dict, where: str) -> GenerationItem:
    prompt = _field(row, "prompt", where)
    answer = _field(row, "answer", where)
    if not isinstance(prompt, str):
        raise TaskError(f"{where}: 'prompt' must be a string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TaskError(f"{where}: 'answer' must be a string or a number")
    return GenerationItem(prompt, str(answer))


def compile_extract(pattern: str | None) -> re.Pattern | None:
    """Compile ``--extract``; a bad regex is a user error."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise TaskError(f"--extract {pattern!r} is not a valid regular expression ({e})") from None


def extract_answer(text: str, pattern: re.Pattern | None) -> str:
    """The answer in a generated ``text``: the first match of ``pattern`` (its first group when it
    has one), else the first non-empty line; stripped. No match gives ''."""
    if pattern is None:
        for line in text.splitlines():
            if line.strip():
                return line.strip()
        return ""
    m = pattern.search(text)
    if m is None:
        return ""
    return (m.group(1) if pattern.groups else m.group(0)).strip()
