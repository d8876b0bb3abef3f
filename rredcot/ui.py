"""Terminal output: the progress bar, the error paragraph, the summary tables (rich)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def make_progress(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def metrics_table(title: str, rows: dict[str, dict[str, Any]]) -> Table:
    """Columns are the dict keys (e.g. "start", "final"); rows are the metrics they share."""
    table = Table(title=title)
    table.add_column("metric")
    for col in rows:
        table.add_column(col, justify="right")
    keys = [k for k in next(iter(rows.values())) if not isinstance(next(iter(rows.values()))[k], (list, dict))]
    for k in keys:
        table.add_row(k, *[_fmt(r.get(k)) for r in rows.values()])
    return table


def summary_table(run: Path, result: dict[str, Any]) -> Table:
    cols = {"start": result["start"], "final": result["final"]} if result.get("start") else {"final": result["final"]}
    return metrics_table(f"rredcot train: {result['steps']} steps, held-out metrics  ({run})", cols)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v)


def note(text: str) -> None:
    """One start-up line for something a user must know (a default that does not apply, a changed
    setting): said once, never silently."""
    err_console.print(f"[yellow]note:[/yellow] {text}", soft_wrap=True, markup=True, highlight=False)


def quiet_unless(main: bool) -> None:
    """Only rank 0 speaks: notes, progress and tables once, not once per process (errors still reach stderr)."""
    console.quiet = not main
    err_console.quiet = not main


class _Survivor:
    """A stdout/stderr that outlives its reader (`rredcot train | head`): once the pipe is closed, output goes
    to /dev/null and the command carries on (a run keeps writing its run directory, where everything is).
    Click would otherwise turn the first BrokenPipeError into exit 1, no message, no eval.json."""

    def __init__(self, stream):
        self._stream, self._gone = stream, False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._closed()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._closed()

    def _closed(self) -> None:
        self._gone = True
        try:  # the stream's buffered bytes, and the interpreter's flush at exit, then go to /dev/null
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextmanager
def surviving_closed_output():
    """sys.stdout and sys.stderr as _Survivor for the block (rich's consoles look them up at each write)."""
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Survivor(sys.stdout), _Survivor(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old
