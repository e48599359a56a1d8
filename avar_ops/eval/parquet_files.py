"""Reading a benchmark's published parquet files from a local file or folder, with schema checks.

Hugging Face dataset releases store images as a struct column ``{bytes, path}``; `LazyImage` keeps the bytes
and decodes them only when the image is needed (one sample at a time during generation).
"""

from __future__ import annotations

import fnmatch
import io
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence


class BenchmarkDataError(ValueError):
    """A benchmark file, split or column is missing or malformed (the message names which)."""


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # an optional dependency: say which extra provides it
        raise BenchmarkDataError("reading benchmark files needs pyarrow: pip install 'avar[eval]'") from exc
    return pq


@dataclass(frozen=True)
class LazyImage:
    """An encoded image from a parquet cell; `load()` decodes it to an RGB PIL image."""

    data: bytes
    where: str  # "file:row:column", for error messages

    def load(self):
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(self.data))
            image.load()
        except Exception as exc:  # PIL raises many types for corrupt data; name the cell instead
            raise BenchmarkDataError("%s: the image bytes cannot be decoded (%s)" % (self.where, exc)) from exc
        return image.convert("RGB")


def find_files(path: str, patterns: Sequence[str], what: str) -> List[str]:
    """`path` itself when it is a file, else the parquet files under it matching one of `patterns` (sorted).

    Patterns are matched against the path relative to `path` with "/" separators, so "data/testmini-*.parquet"
    and "*/validation-*.parquet" both work.
    """
    if os.path.isfile(path):
        if not path.endswith(".parquet"):
            raise BenchmarkDataError("%s: expected a .parquet file or a folder, got %s" % (what, path))
        return [path]
    if not os.path.isdir(path):
        raise BenchmarkDataError("%s: no such file or folder: %s" % (what, path))
    found = []
    for root, _, files in os.walk(path):
        for name in files:
            if not name.endswith(".parquet"):
                continue
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            if any(fnmatch.fnmatch(rel, p) for p in patterns):
                found.append(full)
    if not found:
        raise BenchmarkDataError(
            "%s: no parquet file matching %s under %s" % (what, " or ".join(repr(p) for p in patterns), path)
        )
    return sorted(found)


def read_rows(files: Sequence[str], required: Sequence[str], optional: Sequence[str], what: str) -> List[Dict]:
    """All rows of `files` as dicts with the `required` columns (an error names any missing) and the `optional`
    ones that exist. Image columns ({bytes, path} structs) become `LazyImage` (or None when empty)."""
    pq = _pyarrow()
    rows: List[Dict] = []
    for file in files:
        try:
            schema = pq.read_schema(file)
        except Exception as exc:  # pyarrow's errors for non-parquet data vary by version
            raise BenchmarkDataError("%s: %s is not a readable parquet file (%s)" % (what, file, exc)) from exc
        names = set(schema.names)
        missing = [c for c in required if c not in names]
        if missing:
            raise BenchmarkDataError(
                "%s: %s lacks column(s) %s (has: %s)" % (what, file, ", ".join(missing), ", ".join(sorted(names)))
            )
        columns = list(required) + [c for c in optional if c in names and c not in required]
        table = pq.read_table(file, columns=columns)
        data = table.to_pydict()
        for i in range(table.num_rows):
            row = {}
            for column in columns:
                value = data[column][i]
                if _is_image_cell(value):
                    value = LazyImage(value["bytes"], "%s:%d:%s" % (file, i, column)) if value.get("bytes") else None
                row[column] = value
            rows.append(row)
    return rows


def _is_image_cell(value) -> bool:
    return isinstance(value, dict) and "bytes" in value and set(value) <= {"bytes", "path"}
