"""The one output-folder policy of every `avar` command, run before a model loads.

`--out` must be a non-empty path that is a folder or does not exist yet, and a file must be writable in it.
Commands that write their results as they go (vas, sweep, demo) get the folder created now, parents included,
and a note on stderr for results they will overwrite. `avar eval` and `avar correlate` create the folder only
once everything else is checked (a rerun of `avar eval` continues the run in it), so for them the folder's
parent must already exist and be writable: a typo in a path does not grow a tree of empty folders.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Sequence

from avar_ops.cli.errors import CLIError

__all__ = ["prepare_out"]


def prepare_out(out: str, command: str, results: Sequence[str] = (), *, create: bool = True) -> str:
    """Check --out (see the module) and return it; CLIError (exit 2) in one line when it cannot be used."""
    if not out or not out.strip():
        raise CLIError("--out: expected a folder path, got an empty string")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out: {out!r} is a file; expected a folder")
    if not create:
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise CLIError(f"--out: the parent folder {parent} does not exist")
        if not os.access(out if os.path.exists(out) else parent, os.W_OK):
            raise CLIError(f"--out: cannot write in {out!r}")
        return out
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise CLIError(f"--out: cannot write in {out!r} ({exc.strerror or exc})") from None
    existing = [name for name in results if os.path.exists(os.path.join(out, name))]
    if existing:
        print(f"avar {command}: note: overwriting {', '.join(existing)} in {out}", file=sys.stderr)
    return out
