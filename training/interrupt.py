"""Ctrl-C during training: the first one asks the run to stop at the end of the step in progress, after a whole
checkpoint of that step is saved (nothing trained is lost); a second one stops at once (the newest checkpoint
is then the one to resume from).

All processes of a data-parallel run get the terminal's SIGINT, but not at the same step; `StopRequest.agreed`
sums the request over the processes so that every process stops after the same step.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

__all__ = ["Interrupted", "StopRequest"]


class Interrupted(Exception):
    """The run stopped at a step boundary on Ctrl-C; a whole checkpoint of `step` is in the output folder."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


class StopRequest:
    """Context manager: while active (in the main thread), the first SIGINT sets `requested`, the next raise."""

    def __init__(self, command: str):
        self.command = command
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"{self.command}: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
            file=sys.stderr,
        )

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop (a collective call: every process must make it each step)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
