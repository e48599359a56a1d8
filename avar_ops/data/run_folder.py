"""The run-folder policy of every command that writes a run (`avar vas/sweep/eval`, `avar-train sft/grpo/vard`).

- A run folder carries `avar_run.json`: the command that wrote it and the settings that define the run.
- A new run takes an empty (or new) folder. A folder that holds a run is refused unless the user says what to
  do with it: resume (continue that run; refused when the folder was made by another command or with other
  settings, which are named) or overwrite (its contents are removed first). A non-empty folder that holds no
  avar run is never written into, and nothing in it is removed.
- One writer per folder: `.avar.lock` holds the writer's pid and host for as long as the run goes. A second
  writer is refused in one line naming them; a lock left by a process of this host that no longer runs is
  taken over, with a note.
- Checkpoints are written into a hidden staging folder and renamed into place once whole, with a marker file
  inside; `latest_checkpoint` picks the newest whole one and notes the half-written ones it skips.
- Logs keyed by step are cut back to the step a resumed run starts from (`truncate_log`), so one log never
  holds two runs' steps.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "CHECKPOINT_MARKER",
    "LOCK_FILE",
    "RUN_FILE",
    "RunFolder",
    "RunFolderError",
    "RunLock",
    "finish_checkpoint",
    "latest_checkpoint",
    "open_run_folder",
    "staging_folder",
    "truncate_log",
]

RUN_FILE = "avar_run.json"
LOCK_FILE = ".avar.lock"
CHECKPOINT_MARKER = "avar_checkpoint.json"
_STAGING = ".staging-"


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message is one line that says why and what to do."""


def _stderr_note(text: str) -> None:
    print(text, file=sys.stderr)


def _plain(value):
    """`value` as JSON would give it back (tuples become lists, unknown objects their str)."""
    return json.loads(json.dumps(value, default=str))


def _write_json(path: str, value) -> None:
    """Write JSON to a temporary file beside `path`, then rename: a reader never sees half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ locks


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class RunLock:
    """`.avar.lock` in a folder, created exclusively; holds {"pid", "host", "command", "since"}."""

    def __init__(self, folder: str, command: str, note: Callable[[str], None] = _stderr_note):
        self.path = os.path.join(folder, LOCK_FILE)
        self.command = command
        self.note = note
        self.held = False

    def _read(self, path: str) -> Optional[dict]:
        try:
            with open(path, encoding="utf-8") as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or damaged

    def acquire(self) -> "RunLock":
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read(self.path)
                if holder is None:  # released meanwhile
                    continue
                if not self._stale(holder):
                    raise RunFolderError(
                        f"{os.path.dirname(self.path) or '.'} is in use by {holder.get('command', 'another run')} "
                        f"(pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
                        f"{holder.get('since', '?')}); wait for it to finish or choose another folder"
                    ) from None
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunFolderError(f"{self.path}: could not take the lock (other processes keep taking it)")

    def _stale(self, holder: dict) -> bool:
        pid, host = holder.get("pid"), holder.get("host")
        if not isinstance(pid, int) or host != socket.gethostname():
            return False  # another host's process cannot be checked from here
        return pid != os.getpid() and not _alive(pid)

    def _take_over(self, holder: dict) -> None:
        # Renaming is atomic: of two processes taking over the same stale lock only one renames it.
        aside = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if self._read(aside) != holder:  # a fresh lock was taken meanwhile: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return
        os.unlink(aside)
        self.note(
            f"{self.command}: note: taking over the lock of pid {holder['pid']} on host {holder['host']}, "
            "which is no longer running"
        )

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


# ------------------------------------------------------------------------------------------------ run folders


class RunFolder:
    """An opened run folder: `mode` is "new", "resume" (a run of the same settings was there) or "overwrite"."""

    def __init__(self, path: str, command: str, mode: str, lock: Optional[RunLock], info: dict):
        self.path = path
        self.command = command
        self.mode = mode
        self.lock = lock
        self.info = info

    def finish(self) -> None:
        """Record in avar_run.json that the run completed."""
        self.info["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        _write_json(os.path.join(self.path, RUN_FILE), self.info)

    def abandon(self) -> None:
        """A run that failed before writing anything: take back its avar_run.json (and the folder, if the run
        made it), so that the corrected command can start it as a new run."""
        if self.mode != "new":
            return
        left = [e for e in os.listdir(self.path) if e not in (RUN_FILE, LOCK_FILE)]
        if left:
            return
        try:
            os.unlink(os.path.join(self.path, RUN_FILE))
        except FileNotFoundError:
            pass
        if self.info.get("created_folder"):
            self.release()
            try:
                os.rmdir(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self.abandon()
        self.release()


def _changed(previous: dict, mine: dict, resumable: Iterable[str]) -> List[str]:
    keep = set(resumable)
    out = []
    for key in sorted(set(previous) | set(mine)):
        if key not in keep and previous.get(key) != mine.get(key):
            out.append(f"{key}: {previous.get(key)!r} -> {mine.get(key)!r}")
    return out


def open_run_folder(
    path: str,
    command: str,
    settings: Dict,
    *,
    resume: bool = False,
    overwrite: bool = False,
    resumable: Sequence[str] = (),
    what: str = "--out",
    flags: Tuple[str, str] = ("--resume", "--overwrite"),
    lock: bool = True,
    note: Callable[[str], None] = _stderr_note,
) -> RunFolder:
    """Create or take `path` for a run of `command` with `settings` (see the module); RunFolderError if it cannot.

    resumable: the settings a resumed run may change (they change no result, e.g. the number of workers).
    what / flags: how the command line names the folder and the resume / overwrite switches, for the messages.
    lock: take the folder's lock (released by `RunFolder.release`); only one process of a multi-process run
    takes it.
    """
    resume_flag, overwrite_flag = flags
    if not isinstance(path, str) or not path.strip():
        raise RunFolderError(f"{what}: expected a folder path, got an empty string")
    if resume and overwrite:
        raise RunFolderError(f"{resume_flag} and {overwrite_flag} exclude each other; choose one")
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunFolderError(f"{what}: {path!r} exists and is not a folder")
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"{what}: cannot write in {path!r} ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunFolderError(f"{what}: cannot write in {path!r}")
    held = RunLock(path, command, note).acquire() if lock else None
    try:
        mode, info = _settle(path, command, _plain(settings), resume, overwrite, resumable, what, flags, note)
    except BaseException:
        if held is not None:
            held.release()
        if created:
            try:
                os.rmdir(path)
            except OSError:
                pass
        raise
    if created:
        info["created_folder"] = True
    return RunFolder(path, command, mode, held, info)


def _settle(path, command, settings, resume, overwrite, resumable, what, flags, note):
    resume_flag, overwrite_flag = flags
    run_file = os.path.join(path, RUN_FILE)
    entries = [e for e in os.listdir(path) if e != LOCK_FILE and not e.startswith(LOCK_FILE + ".")]
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    fresh = {"command": command, "settings": settings, "started": now}
    if not entries:
        _write_json(run_file, fresh)
        return "new", fresh
    previous = None
    if os.path.isfile(run_file):
        try:
            with open(run_file, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None
    if not isinstance(previous, dict) or not isinstance(previous.get("settings"), dict):
        raise RunFolderError(
            f"{what}: {path!r} is not empty and holds no avar run ({RUN_FILE} missing or unreadable); "
            "choose an empty or new folder (nothing in it is removed)"
        )
    if previous.get("command") != command:
        raise RunFolderError(
            f"{what}: {path!r} holds a run of `{previous.get('command')}`, not `{command}`; choose another folder"
        )
    if overwrite:
        for entry in entries:
            full = os.path.join(path, entry)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
        note(f"{command}: note: removed the previous run in {path} ({overwrite_flag})")
        _write_json(run_file, fresh)
        return "overwrite", fresh
    if not resume:
        raise RunFolderError(
            f"{what}: {path!r} already holds a run (started {previous.get('started', '?')}); pass {resume_flag} to "
            f"continue it or {overwrite_flag} to replace it"
        )
    changed = _changed(previous["settings"], settings, resumable)
    if changed:
        raise RunFolderError(
            f"{what}: {path!r} holds a run with other settings ({'; '.join(changed)}); resume it with the same "
            f"settings, or pass {overwrite_flag} or use a new folder to start another run"
        )
    for entry in entries:  # checkpoints a killed run left half-written
        if entry.startswith(_STAGING):
            shutil.rmtree(os.path.join(path, entry), ignore_errors=True)
    previous["settings"] = settings  # the resumable ones as this run has them
    previous.pop("finished", None)
    previous.setdefault("resumed", []).append(now)
    _write_json(run_file, previous)
    return "resume", previous


# ------------------------------------------------------------------------------------------------ checkpoints


def staging_folder(folder: str, name: str) -> str:
    """Where checkpoint `name` of `folder` is written before `finish_checkpoint` renames it into place."""
    return os.path.join(folder, _STAGING + name)


def finish_checkpoint(staging: str, final: str, info: Optional[dict] = None) -> str:
    """Mark the checkpoint written in `staging` as whole and rename it to `final` (replacing a stale one)."""
    _write_json(os.path.join(staging, CHECKPOINT_MARKER), {"complete": True, **(info or {})})
    if os.path.lexists(final):
        shutil.rmtree(final) if os.path.isdir(final) and not os.path.islink(final) else os.unlink(final)
    os.rename(staging, final)
    return final


def latest_checkpoint(
    folder: str, prefix: str = "checkpoint-", note: Callable[[str], None] = _stderr_note
) -> Optional[str]:
    """The newest `<prefix><step>` folder in `folder` that carries the completion marker, or None.

    Newer ones without the marker (a save that was killed, or one written before markers existed) are skipped,
    each with a note."""
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        tail = name[len(prefix) :]
        if name.startswith(prefix) and tail.isdigit() and os.path.isdir(os.path.join(folder, name)):
            steps.append(int(tail))
    for step in sorted(steps, reverse=True):
        path = os.path.join(folder, f"{prefix}{step}")
        if os.path.isfile(os.path.join(path, CHECKPOINT_MARKER)):
            return path
        note(f"note: skipping {path}: it is not a whole checkpoint (no {CHECKPOINT_MARKER}; its save was cut short)")
    return None


def truncate_log(path: str, last_step: int) -> int:
    """Drop the rows of the JSONL log `path` whose "step" is above `last_step` (and a torn last line); returns
    how many rows were dropped. A resumed run logs those steps again."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > last_step:
                dropped += 1
                continue
            kept.append(line if line.endswith(b"\n") else line + b"\n")
    if dropped:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped
