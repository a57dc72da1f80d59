"""The one reader of user text files (prompts, corpora, task files, recipes, templates, configs).

UTF-8 only, with a leading byte-order mark dropped (Excel's "CSV UTF-8" and Notepad write one);
anything else is one error naming the file and the first bad byte, never a UnicodeDecodeError.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path

from mlxmerge.errors import MlxmergeError

__all__ = ["decode_text", "read_text"]

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def decode_text(
    data: bytes, source: str | os.PathLike, error: type[MlxmergeError] = MlxmergeError
) -> str:
    """``data`` decoded as UTF-8 without its BOM; ``error`` names ``source`` and the byte offset
    (counted in the file, BOM included) when it is not UTF-8."""
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        bom = "; it starts with a UTF-16 byte-order mark" if data.startswith(_UTF16_BOMS) else ""
        raise error(
            f"{source}: not UTF-8 text ({e.reason} at byte {e.start + skip}{bom}); save it as UTF-8"
        ) from None


def read_text(
    path: str | os.PathLike, what: str = "file", error: type[MlxmergeError] = MlxmergeError
) -> str:
    """The text of ``path`` (``decode_text``); ``error`` ``"PATH: WHAT not found"`` when it is
    not a file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror})") from None
    return decode_text(data, path, error)


# A recipe of a thousand slices with per-layer gradients is ~10⁵ values; the 9 x 9 alias bomb is 9⁹.
MAX_YAML_NODES = 1_000_000


def yaml_documents(
    text: str, source: str | os.PathLike, error: type[MlxmergeError] = MlxmergeError,
    max_nodes: int = MAX_YAML_NODES,
) -> list:  # fmt: skip
    """The documents of YAML ``text`` (``yaml.safe_load_all``, ``None`` documents dropped).

    PyYAML builds an alias (``*name``) as a second reference to one object, so loading is linear
    in the text; whatever walks the result later sees the expanded tree. ``error`` refuses, before
    that, a text whose expansion holds more than ``max_nodes`` values (an alias bomb) or whose
    aliases form a cycle. Raises ``yaml.YAMLError`` for text that is not YAML."""
    import yaml

    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    sizes: dict[int, int] = {}  # id(container) -> expanded size; -1 while being counted

    def size(x) -> int:
        if not isinstance(x, (dict, list)):
            return 1
        known = sizes.get(id(x))
        if known == -1:
            raise error(f"{source}: a YAML alias refers to a value that contains it (a cycle)")
        if known is not None:
            return known
        sizes[id(x)] = -1
        items = [v for kv in x.items() for v in kv] if isinstance(x, dict) else x
        total = 1
        for v in items:
            total += size(v)
            if total > max_nodes:
                raise error(
                    f"{source}: its YAML aliases (*name) expand to more than {max_nodes:,} values; "
                    "refused (an alias bomb?)"
                )
        sizes[id(x)] = total
        return total

    total = 0
    for d in docs:
        total += size(d)
        if total > max_nodes:
            raise error(f"{source}: more than {max_nodes:,} YAML values; refused")
    return docs
