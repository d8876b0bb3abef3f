"""File-system faults as one paragraph: what failed, on which path, what the error means, and the fix.

Every command ends up here (rredcot.cli.main) for an OSError nothing nearer handled: a full disk during a
checkpoint, a read-only or unwritable run_dir or cache_dir, a path too long, a file where a directory must be.
The checkpoint being written is a `step_N.tmp` that is never read, so the previous checkpoint stays the one
a resume starts from (runlog.save_checkpoint); the message says so when a run directory is involved.
"""

from __future__ import annotations

import errno
import os

_SPACE = (
    "Free space on that disk, or point run_dir= (and cache_dir= or RREDCOT_CACHE, for the warm-start cache) at "
    "one with room; a checkpoint interrupted by it is never used, so `rredcot train resume=true run_dir=RUN` "
    "continues from the last complete one"
)
_ACCESS = (
    "Choose a directory you can write: run_dir=DIR for the run (cache_dir=DIR or RREDCOT_CACHE for the "
    "warm-start cache), or change the path's permissions"
)
FIXES = {
    errno.ENOSPC: _SPACE,
    errno.EDQUOT: _SPACE,
    errno.EACCES: _ACCESS,
    errno.EPERM: _ACCESS,
    errno.EROFS: "That file system is mounted read-only: choose a writable run_dir=DIR (and cache_dir=DIR)",
    errno.ENAMETOOLONG: "Use a shorter path (run_dir=, cache_dir= or the data file's path); most file systems "
    "allow 255 bytes per name",
    errno.ENOTDIR: "A file stands where a directory is needed on that path: choose another path, or move the file",
    errno.EEXIST: "Something already exists at that path: choose another path, or move it away",
    errno.EISDIR: "That path is a directory where a file is expected: name the file itself",
    errno.ENOENT: "A file or directory it needs is not there (deleted or moved while the command ran?): restore it "
    "or point the command at where it is now",
    errno.EMFILE: "The process has too many files open: raise the limit (ulimit -n 65536) and run again",
    errno.ENFILE: "The system has too many files open: close other programs' files, or raise fs.file-max",
    errno.EIO: "The disk reported an I/O error: check the device (dmesg) and use another disk",
    errno.ELOOP: "The path has a symbolic-link loop: fix the link",
}


def oserror_message(e: OSError) -> str | None:
    """The paragraph for `e`, or None when it is not a file-system fault a user can fix (then it is a bug)."""
    fix = FIXES.get(e.errno)
    if fix is None:
        return None
    where = f" on {str(e.filename)!r}" if e.filename else ""
    if e.filename2:
        where += f" (and {str(e.filename2)!r})"
    meaning = os.strerror(e.errno)
    return f"A file-system operation failed{where}: {meaning} ({errno.errorcode[e.errno]}). {fix}."
