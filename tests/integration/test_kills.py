"""A run killed at any moment and resumed ends with the same metrics as the run that never stopped.

The reference is the shared debug=fast run; the killed runs add train.save_every=1 (checkpoint writes
do not touch the RNG, so the reference is still the same run) so that kills often land mid-write.
A kill before the first checkpoint leaves a run with nothing to resume: the CLI then says `rm -r`,
and the test does what it says.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO

ARGS = ["train", "debug=fast", "train.save_every=1", "logging.progress=false"]
VOLATILE = ("time/", "tokens/s", "memory/")  # wall-clock numbers differ between any two runs


def _start(run: Path) -> subprocess.Popen:
    from rredcot.runlog import checkpoints

    resume = ["resume=true"] if run.exists() and checkpoints(run) else []
    if (run / "metrics.jsonl").exists() and not resume:
        proc = subprocess.run(
            [sys.executable, "-m", "rredcot", *ARGS, f"run_dir={run}"], cwd=REPO, capture_output=True, text=True
        )
        assert proc.returncode == 2 and f"rm -r {run}" in proc.stderr, proc.stderr  # the dead end once reported
        shutil.rmtree(run)
    return subprocess.Popen(
        [sys.executable, "-m", "rredcot", *ARGS, f"run_dir={run}", *resume],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def _finish(run: Path) -> None:
    """Resume until the run has finished (each resume exits 0 or is itself a clean stop)."""
    for _ in range(5):
        if (run / "eval.json").exists():
            return
        proc = _start(run)
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert (run / "eval.json").exists()


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _assert_same_run(run: Path, reference: Path) -> None:
    got, want = _metrics(run), _metrics(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # no duplicated or missing rows
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (g["step"], k)
    assert (
        json.loads((run / "eval.json").read_text())["start"]
        == json.loads((reference / "eval.json").read_text())["start"]
    )
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_sigkill_during_a_checkpoint_write_then_resume_is_the_same_run(fast_run, tmp_path):
    run = tmp_path / "mid_write"
    proc = _start(run)
    deadline = time.time() + 300
    while time.time() < deadline and not list((run / "checkpoints").glob("*.tmp")):
        time.sleep(0.001)
    proc.kill()  # SIGKILL: no handler runs; the half-written step_N.tmp stays behind
    proc.communicate(timeout=60)
    _finish(run)
    _assert_same_run(run, fast_run)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT", "SIGINT twice"])
def test_killed_at_random_moments_then_resumed_is_the_same_run(how, fast_run, tmp_path):
    rng = random.Random(how)
    run = tmp_path / "random"
    for _ in range(3):  # three kills, each at a random moment of a ~10 s process (start-up included)
        proc = _start(run)
        time.sleep(rng.uniform(0.5, 10))
        sig = getattr(signal, how.split()[0])
        proc.send_signal(sig)
        if how.endswith("twice"):
            time.sleep(rng.uniform(0, 0.5))
            proc.send_signal(sig)
        out = proc.communicate(timeout=600)[0]
        assert "Traceback" not in out or proc.returncode in (0, -9), out[-3000:]
    _finish(run)
    _assert_same_run(run, fast_run)
