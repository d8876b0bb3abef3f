"""A fork server for the CLI tests: `python -m rredcot ARGS` without paying the interpreter's import of torch,
transformers, accelerate and Hydra each time (about 6 s of CPU per process on the 2-core machine).

The server imports the package once and never computes anything (no thread pools started, no registry
filled by a plug-in, no config composed), then forks one child per request. The child is a fresh process in
every way a test can see: its own pid, working directory, environment, sys.path (the request's PYTHONPATH and
working directory first, as `python -m` does), argv, stdout and stderr files; it runs the `rredcot` module as
`__main__` with runpy, the way `python -m rredcot` does, and exits with the status the real command would.
What it cannot reproduce (interpreter start-up itself, a PYTHON* variable read at start-up) is what the tests
that start real processes (test_kills, the SIGTERM and torchrun tests) keep covering.

Protocol (pickled, length-prefixed, over the server's stdin / stdout): request (args, env, cwd, out, err) ->
("pid", pid), then ("exit", status). Run as `python -m tests.integration.zygote` from the repository root.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys


def send(fd: int, obj) -> None:
    data = pickle.dumps(obj)
    os.write(fd, struct.pack("<I", len(data)) + data)


def recv(fd: int):
    head = _read(fd, 4)
    if not head:
        return None
    return pickle.loads(_read(fd, struct.unpack("<I", head)[0]))


def _read(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            return out
        out += chunk
    return out


def _child(args: list[str], env: dict, cwd: str, out: str, err: str) -> int:
    """In the forked child: become `python -m rredcot ARGS` in `cwd` with `env`, stdout/stderr to files."""
    import io
    import runpy
    import traceback

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [cwd, *extra]  # python -m: the working directory first, then PYTHONPATH
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
        target = os.open(path, flags | (os.O_CREAT | os.O_TRUNC if fd else 0), 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True)
    sys.argv = ["rredcot", *args]
    try:
        runpy.run_module("rredcot", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # a real interpreter dies of SIGINT: return code -2
        traceback.print_exc()
        code = -2
    except BaseException:
        traceback.print_exc()
        code = 1
    import atexit
    import threading

    threading._shutdown()  # as a normal exit: wait for non-daemon threads (a command that would hang, hangs)
    atexit._run_exitfuncs()  # then what it runs at exit (log writers, multiprocessing clean-up)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    inp, outp = os.dup(0), os.dup(1)  # the protocol's pipes; fds 0 and 1 are the children's to redirect
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    import rredcot.cli  # noqa: F401  the heavy imports, once: the command's own and the trainer's
    import rredcot.compare_report  # noqa: F401
    import rredcot.credit_report  # noqa: F401
    import rredcot.trainer  # noqa: F401

    send(outp, ("ready", os.getpid()))
    while True:
        req = recv(inp)
        if req is None:
            return
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(inp)
                os.close(outp)
                code = _child(*req)
            finally:
                if code < 0:  # die of the signal, as the real process would (SIGINT: return code -2)
                    signal.signal(-code, signal.SIG_DFL)
                    os.kill(os.getpid(), -code)
                os._exit(code & 0xFF)  # never back into this loop
        send(outp, ("pid", pid))
        _, status = os.waitpid(pid, 0)
        send(outp, ("exit", os.waitstatus_to_exitcode(status)))


if __name__ == "__main__":
    serve()
