"""Hard time limits on verification: no completion can hang a run.

A verifier is user-facing code run on model output, and model output is adversarial by accident: a
200-deep nested fraction keeps a symbolic checker busy for minutes, and signal-based timeouts only
work on the main thread. `Guarded` runs a verifier's `__call__`, `extract` and `judge` in a forked
worker process; a call that is not back within `timeout_s` kills the worker (a fresh one starts for
the next call) and scores 0 with the extractor name "timeout" (extract: no answer; judge: 0).
`run_guarded` adds a time budget per batch: once it is spent,
the remaining completions score 0 as "over_budget" without being run. Both are counted in the step's
metrics (extractor/timeout, extractor/over_budget).
A worker that dies in a call (a segfault in a C extension, the out-of-memory killer, a plug-in's
os._exit) scores that call 0 as "crashed" and a fresh one serves the next; a worker that dies on
`MAX_DEATHS` calls in a row is the verifier's doing, not one completion's, and raises VerifierDied.
A round trip costs well under a millisecond; a step makes a few hundred.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from typing import Any

from rredcot.types import Sample, Score

TIMEOUT, OVER_BUDGET, CRASHED = "timeout", "over_budget", "crashed"
MAX_DEATHS = 3
IN_WORKER = False  # True inside a worker: verifiers may then skip their own (signal-based) timeouts


def _serve(verifier: Any, conn: Any, parent_end: Any) -> None:
    """The worker loop: (method, args) in, ("ok", result) or ("error", text) out, until EOF (the training
    process closed its end or died: the worker never outlives it)."""
    global IN_WORKER
    IN_WORKER = True
    parent_end.close()  # the fork copied it; while open here, a dead parent would never read as EOF
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM are the training process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", getattr(verifier, method)(*args)))
        except Exception as e:
            conn.send(("error", (summary(e), traceback.format_exc(limit=4))))


def summary(e: BaseException) -> str:
    """'ValueError: boom (at /path/plugin.py:16, in __call__)': the exception and the frame that raised it."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}{where}"


class VerifierRaised(RuntimeError):
    """The verifier raised in its worker; `summary` is one line (the full traceback is the message)."""

    def __init__(self, summary: str, text: str):
        super().__init__(text)
        self.summary = summary


class VerifierDied(RuntimeError):
    """The worker died on MAX_DEATHS calls in a row; `status` is its exit status (negative: the signal)."""

    def __init__(self, status: int | None):
        super().__init__(f"the verifier's worker process died (exit status {status})")
        self.status = status


class Guarded:
    """A verifier whose calls run in a worker process under a hard timeout (same interface)."""

    def __init__(self, verifier: Any, timeout_s: float):
        self.verifier, self.timeout_s = verifier, timeout_s
        self._proc: Any = None
        self._conn: Any = None
        self._pid = os.getpid()
        self.deaths = 0  # calls in a row whose worker died

    def __getattr__(self, name: str) -> Any:  # anything else a plug-in verifier has
        return getattr(self.__dict__["verifier"], name)

    def _start(self) -> None:
        ctx = mp.get_context("fork")  # the child inherits the verifier, plug-ins included (nothing to pickle)
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve, args=(self.verifier, child, self._conn), daemon=True, name="rredcot-verify"
        )
        self._proc.start()
        child.close()
        self._pid = os.getpid()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
        self._proc = self._conn = None

    def _run(self, method: str, args: tuple, on_timeout: Any, on_crash: Any) -> Any:
        if self._proc is None or not self._proc.is_alive() or self._pid != os.getpid():
            self._start()
        try:
            self._conn.send((method, args))
            if not self._conn.poll(self.timeout_s):
                self.stop()  # the call is stuck: kill it; the next call starts a fresh worker
                return on_timeout
            status, value = self._conn.recv()
        except (EOFError, OSError):  # the worker died in the call (poll reads its end of the pipe as ready)
            return self._died(on_crash)
        self.deaths = 0
        if status == "error":
            raise VerifierRaised(value[0], f"The verifier {type(self.verifier).__name__}.{method} raised:\n{value[1]}")
        return value

    def _died(self, on_crash: Any) -> Any:
        self._proc.join(5)
        status = self._proc.exitcode
        self.stop()
        self.deaths += 1
        if self.deaths >= MAX_DEATHS:
            raise VerifierDied(status)
        return on_crash

    def __call__(self, completion: str, sample: Sample):
        return self._run("__call__", (completion, sample), Score(0.0, TIMEOUT), Score(0.0, CRASHED))

    def extract(self, completion: str) -> tuple[str | None, str]:
        return self._run("extract", (completion,), (None, TIMEOUT), (None, CRASHED))

    def judge(self, answer: str | None, sample: Sample) -> float | None:
        return self._run("judge", (answer, sample), 0.0, 0.0)

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:
            pass


def run_guarded(fn: Any, texts: list[str], samples: list[Sample], budget_s: float) -> list[Any]:
    """fn(text, sample) for each pair until `budget_s` seconds have passed (0 = no budget); the rest
    score 0 as OVER_BUDGET."""
    start, out = time.monotonic(), []
    for text, sample in zip(texts, samples):
        if budget_s and time.monotonic() - start > budget_s:
            out.append(Score(0.0, OVER_BUDGET))
        else:
            out.append(fn(text, sample))
    return out
