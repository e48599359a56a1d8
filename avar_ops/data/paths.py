"""Where the tools write: file names made from user data, and the check that a path stays in the output folder.

Anything taken from a sample file or a model label (a JSONL `id`, a checkpoint's folder name) goes through
`safe_name` before it becomes part of a file name, and every file the tools write is placed with `inside`, so
that neither `"../../elsewhere"` nor `"coco/000123"` can create a folder or a file outside the one the user gave.
"""

from __future__ import annotations

import os
from typing import Iterable, List

__all__ = ["safe_name", "inside", "unique_safe_names"]

_KEEP = "-_."
_MAX_NAME = 120  # well under the 255 bytes most file systems allow, leaving room for prefixes and suffixes


def safe_name(text: str, default: str = "item") -> str:
    """`text` as one file-name component: letters, digits, '-', '_' and '.' kept, anything else '_'.

    Path separators become '_' (so no sub-folders), a name made only of dots ('.', '..') becomes `default`,
    and names are cut to 120 characters.
    """
    name = "".join(c if (c.isascii() and c.isalnum()) or c in _KEEP else "_" for c in str(text))[:_MAX_NAME]
    return default if not name.strip(".") else name


def unique_safe_names(texts: Iterable[str], what: str = "ids") -> List[str]:
    """`safe_name` of each text; ValueError when two different texts give the same name (they would share files)."""
    names, seen = [], {}
    for text in texts:
        name = safe_name(text)
        if name in seen and seen[name] != text:
            raise ValueError(
                f"{what} {seen[name]!r} and {text!r} give the same file name {name!r}; make them differ in letters "
                "or digits"
            )
        seen[name] = text
        names.append(name)
    return names


def inside(out_dir: str, *parts: str) -> str:
    """os.path.join(out_dir, *parts), refused with ValueError unless it resolves to a path inside out_dir."""
    root = os.path.realpath(out_dir)
    path = os.path.join(out_dir, *parts)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root or real == root:
        raise ValueError(f"refusing to write {path!r}: it is not inside the output folder {out_dir!r}")
    return path
