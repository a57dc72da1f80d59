"""The state file of a search: every candidate scored so far, rewritten after each one.

``--resume`` replays the search from the same seed: CMA-ES proposes the same candidates in the
same order, the ones in the file take their stored scores instead of being merged and scored
again, and the search goes on from the first one missing. The result is that of a run that was
never interrupted (the tests check it). JSON, so it can be read while the search runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from mlxmerge.errors import MlxmergeError

VERSION = 1


class StateError(MlxmergeError):
    """A state file is missing, unreadable, or belongs to another search."""


def default_path(output: str | Path) -> Path:
    """``OUT.evolve.json`` beside the output folder."""
    output = Path(output).expanduser()
    return output.with_name(output.name + ".evolve.json")


def write_state(path: Path, header: dict, candidates: list[dict]) -> None:
    """Replace ``path`` atomically (a Ctrl-C mid-write leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": VERSION, **header, "candidates": candidates}, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(path: Path, header: dict) -> list[dict]:
    """The candidates of ``path``, after checking it was written by the search ``header`` describes."""
    if not path.is_file():
        raise StateError(f"{path}: no state file to resume from (run without --resume first)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StateError(f"{path}: unreadable state file ({e})") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise StateError(f"{path}: not an mlxmerge evolve state file (version {VERSION})")
    for key, value in header.items():
        if data.get(key) != value:
            raise StateError(
                f"{path}: written by a search with {key} = {data.get(key)!r}, this one has "
                f"{value!r}; resume with the same config, task files and options, or start "
                "over with --force"
            )
    return list(data.get("candidates", []))
