"""How the `avar` commands fail: one line on stderr and an exit status, never a traceback."""

from __future__ import annotations

__all__ = ["CLIError", "DataError", "Interrupted", "one_line"]


class CLIError(Exception):
    """A user error the command reports in one line instead of a traceback: the command line is wrong (exit 2)."""

    code = 2


class DataError(CLIError):
    """The content of a file the command line names is wrong (exit 1)."""

    code = 1


class Interrupted(CLIError):
    """Ctrl-C: the command stopped with everything finished so far saved (exit 130)."""

    code = 130


def one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
