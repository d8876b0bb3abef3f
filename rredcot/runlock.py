"""One writer per run directory: `rredcot train` holds an exclusive lock on RUN/.lock while it runs.

Two trains on one run_dir would interleave their metrics rows and overwrite each other's checkpoints, and
both would exit 0. The lock is flock(2) on an open file: the kernel releases it when the process ends in any
way (exit, exception, SIGKILL, a node that reboots), so a crashed run never leaves a stale lock to clear by
hand. The file stays once a run began (deleting a lock file that another process may have opened lets two holders in);
it holds the last holder's pid, host and start time for the message a second writer gets. On NFS, Linux
emulates flock with POSIX locks, which the server arbitrates across nodes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from rredcot.errors import UserError

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; one writer is then the user's to ensure
    fcntl = None


class RunLock:
    """`lock = RunLock(run); lock.acquire()` ... `lock.release()` (also on garbage collection: the fd closes)."""

    def __init__(self, run: Path):
        self.run, self.fd, self.created, self.made_file = Path(run), None, False, False
        self.began = False  # set once the run's files are written: from then on the lock file stays

    def acquire(self) -> None:
        """Take the lock or refuse (UserError) naming who holds it. Creates the directory if it is new
        (release removes it again if nothing else was written there)."""
        if fcntl is None:
            return
        if self.run.exists() and not self.run.is_dir():
            raise UserError(
                f"run_dir={str(self.run)!r} is an existing file, not a directory (nothing was changed). Choose "
                "another run_dir=PATH, or leave run_dir out for a new runs/<date>_<time>."
            )
        self.created = not self.run.exists()
        self.made_file = not (self.run / LOCK_FILE).exists()
        self.run.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise UserError(_held_message(self.run, holder)) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        os.close(self.fd)  # closing the only descriptor releases the flock
        self.fd = None
        if self.made_file and not self.began:
            (self.run / LOCK_FILE).unlink(missing_ok=True)  # an error before the run began leaves nothing behind
            if self.created and not any(self.run.iterdir()):
                self.run.rmdir()

    def __del__(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _held_message(run: Path, holder: str) -> str:
    try:
        h = json.loads(holder)
        who = f"process {h['pid']} on {h['host']}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
        who = "another process"
    return (
        f"Run directory {str(run)!r} is being written by another `rredcot train` ({who}); two writers would "
        "mix their metrics and checkpoints, so this one did not start (nothing was written). Wait for it to "
        f"finish, stop it (`touch {run}/STOP` checkpoints it and exits), or choose another run_dir=PATH."
    )
