"""Stopping safely: Ctrl-C, SIGTERM (what SLURM sends at the time limit) or a file named STOP in the run
directory end a run at a step boundary.

The first signal asks the loop to stop after the step in progress; the loop then saves a checkpoint
whose state (weights, optimizer, prompt cursor, RNG) is exactly the state between two steps, so a
resumed run continues as if it had never stopped. A second signal stops at once without saving: the
last checkpoint stays the one to resume from. The STOP file reaches every rank of every node through
the shared run directory, without a signal passing through the launcher (torchrun kills workers that
outlive its own SIGTERM by 30 s): scripts/slurm/ write it when the job's time is nearly up.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

from rredcot.ui import console

STOP_FILE = "STOP"  # `touch RUN_DIR/STOP`: checkpoint after the step in progress and exit (resume=true continues)


class GracefulStop:
    """`with GracefulStop() as stop: ... if stop.requested: save and leave` (signals restored on exit)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop_file: Path | None = None) -> None:
        self.signal: str | None = None
        self.stop_file = stop_file
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> str | None:
        """What asked the run to stop (a signal's name, or the stop file), or None."""
        if self.signal:
            return self.signal
        if self.stop_file is not None and self.stop_file.exists():
            return f"{self.stop_file} exists"
        return None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal:
            raise KeyboardInterrupt(f"second {name}")
        self.signal = name
        console.print(
            f"[yellow]{name}: finishing the step in progress, then saving a checkpoint "
            "(send it again to stop now without saving)."
        )

    def __enter__(self) -> "GracefulStop":
        self._old = install(self.SIGNALS, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        restore(self._old)


def install(signals, handler) -> dict[int, object]:
    """`handler` for each of `signals`; returns the handlers it replaced (for `restore`). Outside the main
    thread signals cannot be caught there, and stay as they are."""
    old = {}
    for sig in signals:
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:
            pass
    return old


def restore(old: dict[int, object]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)
