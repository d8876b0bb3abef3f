"""The warm-start cache under parallel runs: a sweep's --jobs 2 (or two test workers) asking for the same
entry at once train it once; the other waits and loads the first one's copy."""

from __future__ import annotations

import multiprocessing
import time

from rredcot.compose import load_config
from rredcot.task import warmstart


def _load(cfg, log: str) -> None:
    """One run's start: its warm start, with every training call noted in `log` (one line per call)."""
    real = warmstart.train_warm_start

    def slow_train(*a, **k):  # long enough that the other run arrives while this one is training
        with open(log, "a") as fh:
            fh.write("trained\n")
        time.sleep(0.5)
        return real(*a, **k)

    warmstart.train_warm_start = slow_train
    warmstart.load_policy(cfg)


def test_two_runs_asking_for_one_entry_at_once_train_it_once(tmp_path):
    cfg = load_config(["debug=fast", f"cache_dir={tmp_path}", "warmstart.examples=64", "warmstart.steps=2"])
    log = tmp_path / "calls.log"
    ctx = multiprocessing.get_context("fork")  # two processes, as two runs of a sweep are
    procs = [ctx.Process(target=_load, args=(cfg, str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text().splitlines() == ["trained"]  # one trained; the other waited and loaded its copy
    entries = [p.name for p in (tmp_path / "warmstart").iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and ".tmp" not in entries[0]  # no temporary directory left behind
