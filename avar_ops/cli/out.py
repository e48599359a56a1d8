"""The output folders of the `avar` commands, checked before a model loads.

`vas`, `sweep` and `eval` write run folders under the shared run-folder policy (`avar_ops.data.open_run_folder`,
see `open_out`): a folder that holds a run is refused unless the command says `--overwrite` (or, for `eval`,
`--resume`), a resumed `eval` must have the settings of the run it continues, and one command writes a folder
at a time. `demo` and `correlate` write plain output folders (`prepare_out`):
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
from typing import Dict, Sequence

from avar_ops.cli.errors import CLIError
from avar_ops.data import RunFolder, RunFolderError, open_run_folder

__all__ = ["add_out_flags", "check_out", "open_out", "prepare_out"]

# Flags that change nothing a run computes, left out of the settings a resumed run must match.
_NOT_SETTINGS = ("out", "resume", "overwrite", "no_progress", "run_command", "command")


def add_out_flags(p, *, resume: bool = False) -> None:
    """--overwrite (and --resume) for a command that writes a run folder."""
    if resume:
        p.add_argument("--resume", action="store_true", help="continue the run in --out (same settings only)")
    p.add_argument("--overwrite", action="store_true", help="remove the run in --out and start again")


def check_out(out: str) -> str:
    """The checks of --out that need nothing created (run first, before the others): a path, not a file."""
    if not out or not out.strip():
        raise CLIError("--out: expected a folder path, got an empty string")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out: {out!r} is a file; expected a folder")
    return out


def open_out(args, command: str, settings: Dict = None, resumable: Sequence[str] = ()) -> RunFolder:
    """--out as a run folder of `avar <command>` (see the module), locked until the returned RunFolder is released
    (use it as a context manager); CLIError (exit 2) in one line when it cannot be used. settings: what defines
    the run (default: the command line's values)."""
    if settings is None:
        settings = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    try:
        return open_run_folder(
            args.out,
            f"avar {command}",
            settings,
            resume=bool(getattr(args, "resume", False)),
            overwrite=bool(getattr(args, "overwrite", False)),
            resumable=resumable,
        )
    except RunFolderError as exc:
        raise CLIError(str(exc)) from None


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
