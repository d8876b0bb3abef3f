"""Stopping safely: Ctrl-C and SIGTERM (what SLURM sends at the time limit) end a run at a step boundary.

The first signal asks the loop to stop after the step in progress; the loop then saves a checkpoint
whose state (weights, optimizer, prompt cursor, RNG) is exactly the state between two steps, so a
resumed run continues as if it had never stopped. A second signal stops at once without saving: the
last checkpoint stays the one to resume from.
"""
from __future__ import annotations

import signal
from types import FrameType

from rredcot.ui import console


class GracefulStop:
    """`with GracefulStop() as stop: ... if stop.requested: save and leave` (signals restored on exit)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            raise KeyboardInterrupt(f"second {name}")
        self.requested = name
        console.print(f"[yellow]{name}: finishing the step in progress, then saving a checkpoint "
                      "(send it again to stop now without saving).")

    def __enter__(self) -> "GracefulStop":
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
