"""Atomic output folders: build beside the target, rename into place when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from mlxmerge.errors import OutputError


def check_output(target: str | os.PathLike, inputs=(), *, force: bool = False) -> Path:
    """Refuse outputs that would clobber data or an input; return the resolved target."""
    target = Path(target).expanduser()
    resolved = target.resolve()
    for ref in inputs:
        p = Path(ref).expanduser()
        if not p.exists():
            continue
        p = p.resolve()
        folder = p if p.is_dir() else p.parent
        if p.suffix == ".gguf" and p.is_file():  # a whole model in one file: siblings are fine
            inside = resolved == p or folder.is_relative_to(resolved)
        else:
            inside = resolved.is_relative_to(folder) or folder.is_relative_to(resolved)
        if inside:
            raise OutputError(f"{target}: output would overwrite or sit inside the input {ref}")
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"{target}: exists and is not a folder")
        if any(target.iterdir()) and not force:
            raise OutputError(
                f"{target}: folder exists and is not empty (use --force to replace it)"
            )
    return target


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike):
    """Yield a temporary folder beside ``target``; on success it replaces ``target``.

    On any exception (Ctrl-C included) the temporary folder is removed and ``target`` is
    left as it was.
    """
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
