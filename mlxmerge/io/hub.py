"""Resolve a model reference (folder, file or Hugging Face repo id) to a local path."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlxmerge.errors import CheckpointError

# What a merge or an edit needs from a repo; never the .bin/.pth duplicates.
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.jinja",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
]

_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+(@[\w.\-/]+)?$")


def split_revision(reference: str) -> tuple[str, str | None]:
    """``org/name@rev`` → (``org/name``, ``rev``)."""
    if "@" in reference and not Path(reference).exists():
        repo, rev = reference.rsplit("@", 1)
        return repo, rev or None
    return reference, None


def is_hub_reference(reference: str | os.PathLike) -> bool:
    """True for ``org/name[@rev]`` that is not a local path."""
    ref = str(reference)
    return (
        bool(_REPO_ID.match(ref))
        and not ref.startswith((".", "/", "~"))
        and not Path(ref).expanduser().exists()
    )


def cached_reference(reference: str) -> Path | None:
    """The local snapshot of a hub reference already in the cache, without downloading; else None."""
    if not _REPO_ID.match(reference) or reference.startswith((".", "/", "~")):
        return None
    repo_id, revision = split_revision(reference)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                      local_files_only=True))  # fmt: skip
    except Exception:  # noqa: BLE001 (not cached, or not a repo id at all)
        return None


def resolve_reference(reference: str | os.PathLike) -> Path:
    """Return a local folder or file for ``reference``, downloading hub repos when allowed."""
    path = Path(reference).expanduser()
    if path.exists():
        return path
    ref = str(reference)
    if not _REPO_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise CheckpointError(f"{ref}: no such file or folder")
    repo_id, revision = split_revision(ref)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001 (the hub client raises many types; all mean "not available")
        offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise CheckpointError(
            f"{ref}: not a local path and could not be fetched from the Hugging Face hub{hint}: "
            f"{type(e).__name__}"
        ) from None
