"""LaTeX answer equivalence through math-verify, in worker processes with a hard per-pair deadline.

math-verify's own timeout uses SIGALRM, which works only in the main thread, and some expressions (towers of
powers, huge polynomials) make sympy run for minutes. Each pair is therefore checked in a separate worker
process; one that misses its deadline is killed and replaced, and the pair is reported as a timeout. A worker
that dies (killed from outside, out of memory) is replaced as well, and its pair is reported as an error.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "math_verify_worker.py")

CORRECT, INCORRECT, TIMEOUT, ERROR = "correct", "incorrect", "timeout", "error"


@dataclass(frozen=True)
class LatexVerdict:
    status: str  # correct | incorrect | timeout | error
    detail: str = ""


class _Worker:
    """One math-verify process, spoken to in JSON lines over its stdin/stdout."""

    def __init__(self, startup_timeout: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", WORKER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.fd = self.proc.stdout.fileno()
        self._buffer = b""
        try:
            line = self.read_line(time.monotonic() + startup_timeout)
        except EOFError:
            line = None
        if line is None:
            self.kill()
            raise RuntimeError("the math-verify worker did not start within %.0f s" % startup_timeout)
        hello = json.loads(line)
        if not hello.get("ready"):
            self.kill()
            raise RuntimeError(
                "math-verify is needed to check LaTeX answers (pip install math-verify): %s" % hello.get("error")
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, message: dict) -> None:
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def read_line(self, deadline: float) -> Optional[bytes]:
        """The next line, or None when the deadline passes first; EOFError when the worker has exited."""
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([self.fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class LatexChecker:
    """Checks (prediction, reference) LaTeX pairs in `workers` processes, `timeout` seconds per pair.

    Workers start on first use. Counts of every status seen are kept in `counts` so that callers (the
    evaluation report, the GRPO logs) can show how many answers were timeouts or checker errors.
    """

    def __init__(self, workers: int = 2, timeout: float = 5.0, startup_timeout: float = 120.0):
        if workers < 1:
            raise ValueError("workers: expected an integer >= 1, got %r" % (workers,))
        if not timeout > 0:
            raise ValueError("timeout: expected seconds > 0, got %r" % (timeout,))
        self.num_workers = int(workers)
        self.timeout = float(timeout)
        self.startup_timeout = float(startup_timeout)
        self.counts: Counter = Counter()
        self._workers: List[_Worker] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "LatexChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for worker in self._workers:
                worker.kill()
            self._workers = []

    def worker_pids(self) -> List[int]:
        return [w.proc.pid for w in self._workers]

    def check(self, pred: str, gold: str) -> LatexVerdict:
        return self.check_many([(pred, gold)])[0]

    def check_many(self, pairs: Iterable[Tuple[str, str]]) -> List[LatexVerdict]:
        pairs = [(str(p), str(g)) for p, g in pairs]
        with self._lock:
            verdicts = self._run(pairs)
        self.counts.update(v.status for v in verdicts)
        return verdicts

    def _healthy_workers(self, wanted: int) -> None:
        for worker in [w for w in self._workers if not w.alive()]:
            worker.kill()
            self._workers.remove(worker)
        while len(self._workers) < wanted:
            self._workers.append(_Worker(self.startup_timeout))

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self.startup_timeout)
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def _run(self, pairs: Sequence[Tuple[str, str]]) -> List[LatexVerdict]:
        verdicts: List[Optional[LatexVerdict]] = [None] * len(pairs)
        if not pairs:
            return []
        self._healthy_workers(min(self.num_workers, len(pairs)))
        queue = list(range(len(pairs)))[::-1]
        idle = list(self._workers)
        busy = {}  # worker -> (pair index, deadline)
        while queue or busy:
            while queue and idle:
                worker, index = idle.pop(), queue.pop()
                try:
                    worker.send({"id": index, "pred": pairs[index][0], "gold": pairs[index][1]})
                except (BrokenPipeError, OSError):
                    # died while idle (killed from outside): replace it and try the pair again
                    idle.append(self._replace(worker))
                    queue.append(index)
                    continue
                busy[worker] = (index, time.monotonic() + self.timeout)
            if not busy:
                continue
            earliest = min(deadline for _, deadline in busy.values())
            by_fd = {w.fd: w for w in busy}
            readable, _, _ = select.select(list(by_fd), [], [], max(0.0, earliest - time.monotonic()))
            for fd in readable:
                worker = by_fd[fd]
                index, deadline = busy[worker]
                try:
                    line = worker.read_line(deadline)
                except EOFError:
                    verdicts[index] = LatexVerdict(ERROR, "the checker process exited while checking this answer")
                    del busy[worker]
                    idle.append(self._replace(worker))
                    continue
                if line is None:
                    continue
                reply = json.loads(line)
                verdicts[index] = LatexVerdict(reply["status"], reply.get("detail", ""))
                del busy[worker]
                idle.append(worker)
            now = time.monotonic()
            for worker, (index, deadline) in list(busy.items()):
                if now < deadline:
                    continue
                try:
                    line = worker.read_line(now)
                except EOFError:
                    line = None
                if line is not None:
                    reply = json.loads(line)
                    verdicts[index] = LatexVerdict(reply["status"], reply.get("detail", ""))
                    del busy[worker]
                    idle.append(worker)
                    continue
                verdicts[index] = LatexVerdict(TIMEOUT, "no verdict within %.3g s" % self.timeout)
                del busy[worker]
                idle.append(self._replace(worker))
        return verdicts  # type: ignore[return-value]


_default: Optional[LatexChecker] = None
_default_lock = threading.Lock()


def default_latex_checker() -> LatexChecker:
    """A process-wide checker (2 workers, 5 s per pair), closed at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = LatexChecker()
            atexit.register(_default.close)
        return _default
