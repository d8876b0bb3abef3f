"""Where commands write, and one writer at a time (issue 21, families 2 and 3): eval and credit write into the
run the user passed (not the run_dir its config recorded) and never over an earlier output; a second train on
a run directory is refused while the first holds it; a resume checks everything (a damaged metrics.jsonl, a
hand-edited config.yaml) before it writes anything; a closed stdout does not end a run; file-system faults
are one paragraph with the path and the fix."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rredcot.oserrors import oserror_message
from rredcot.runlock import RunLock
from tests.integration.conftest import REPO, cli, run_main


def _said(proc) -> str:
    return " ".join((proc.stdout + proc.stderr).split())


def _digest(root: Path) -> dict[str, str]:
    """Every file under root -> its sha256: the test that nothing was written (but .lock, which records who
    last held the lock: no data of the run)."""
    files = [p for p in root.rglob("*") if p.is_file() and p.name != ".lock"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def copied_run(fast_run, tmp_path) -> Path:
    """A copy of a finished 4-step run (its config.yaml still records the original's run_dir)."""
    run = tmp_path / "copy"
    shutil.copytree(fast_run, run)
    return run


SMALL_EVAL = ("eval.n_prompts=2", "eval.n_samples=1", "eval.ks=[1]", "logging.progress=false")  # where, not how well
SMALL_CREDIT = ("credit.prompts=1", "credit.estimators=[uniform]", "logging.progress=false")


def test_eval_and_credit_write_into_the_run_passed_never_the_recorded_one(fast_run, copied_run, tmp_path):
    original = _digest(fast_run)
    cli("eval", f"checkpoint={copied_run}", *SMALL_EVAL)
    assert [p.name for p in (copied_run / "evals").iterdir()] == ["step_000004_test.json"]
    for _ in range(2):  # a second credit report goes beside the first, not over it
        cli("credit", f"checkpoint={copied_run}", *SMALL_CREDIT)
    assert (copied_run / "credit" / "credit.json").exists() and (copied_run / "credit-2" / "credit.json").exists()
    assert not (copied_run / "credit.json").exists()
    assert _digest(fast_run) == original  # the original run is untouched
    moved = tmp_path / "moved"
    copied_run.rename(moved)  # a moved run does not re-create its old path
    cli("eval", f"checkpoint={moved}", *SMALL_EVAL)
    assert not copied_run.exists() and len(list((moved / "evals").iterdir())) == 2


def test_credit_into_a_directory_with_a_report_is_refused(copied_run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "credit.json").write_text("my own notes")
    proc = cli("credit", f"checkpoint={copied_run}", f"run_dir={mine}", "credit.prompts=2", check=False)
    assert proc.returncode == 2 and "already holds them" in _said(proc)
    assert (mine / "credit.json").read_text() == "my own notes"


def test_a_second_writer_is_refused_and_a_lock_left_by_a_dead_run_is_not(copied_run):
    held = RunLock(copied_run)
    held.acquire()  # as a train running in another process would
    before = _digest(copied_run)
    proc = cli("train", "resume=true", f"run_dir={copied_run}", "train.steps=6", check=False)
    assert proc.returncode == 2 and f"process {os.getpid()}" in _said(proc), _said(proc)
    assert "nothing was written" in _said(proc)
    assert _digest(copied_run) == before
    held.release()  # the lock file stays, as after a crash: it is not a lock
    cli("train", "resume=true", f"run_dir={copied_run}", "train.steps=6", "logging.progress=false")
    assert json.loads((copied_run / "eval.json").read_text())["steps"] == 6


def test_a_resume_checks_metrics_before_it_writes(copied_run):
    metrics = copied_run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:2]) + "{not json\n" + "".join(lines[2:]))  # damaged in the middle
    before = _digest(copied_run)
    proc = cli("train", "resume=true", f"run_dir={copied_run}", "train.steps=6", check=False)
    assert proc.returncode == 2 and "line 3 is not a metrics row" in _said(proc) and "sed -i '3d'" in _said(proc)
    assert _digest(copied_run) == before  # config.yaml, overrides.yaml, resumes.jsonl: as they were
    subprocess.run(["sed", "-i", "3d", str(metrics)], check=True)  # the fix the message gives
    metrics.write_text(metrics.read_text() + '{"step": 4, "reward/me')  # and a last line cut off mid-write
    proc = cli("train", "resume=true", f"run_dir={copied_run}", "train.steps=6", "logging.progress=false")
    assert "last line was cut off" in _said(proc)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["step"] > 4] == [5, 6, 6]  # step rows, then the final evaluation's


def test_a_hand_edited_config_is_refused_with_the_way_back(copied_run):
    cfg = yaml.safe_load((copied_run / "config.yaml").read_text())
    cfg["optim"]["lr"] = 0.5
    (copied_run / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = cli("train", "resume=true", f"run_dir={copied_run}", "train.steps=5", check=False)
    said = _said(proc)
    assert proc.returncode == 2 and "optim.lr: " in said and "-> 0.5" in said, said
    restore = said[said.index("(cp ") + 1 : said.index(")", said.index("(cp "))].split()
    subprocess.run(restore, check=True)  # the fix the message gives
    cli("train", "resume=true", f"run_dir={copied_run}", "train.steps=5", "logging.progress=false")
    assert yaml.safe_load((copied_run / "config.yaml").read_text())["optim"]["lr"] != 0.5


def test_a_closed_stdout_does_not_end_the_run(copied_run):
    # a real process (its stdout a pipe that `head` closes after one byte); one more step of a finished run
    run = copied_run
    cmd = f"set -o pipefail; {sys.executable} -m rredcot train resume=true run_dir={run} train.steps=5 | head -c 1"
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "eval.json").read_text())["steps"] == 5 and "Traceback" not in proc.stderr


def test_run_dir_that_is_a_file_or_too_long_is_refused_before_loading(tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("mine")
    code, err = run_main(f"train debug=fast run_dir={afile}")
    assert code == 2 and "is an existing file, not a directory" in err and afile.read_text() == "mine"
    code, err = run_main(f"train debug=fast run_dir={tmp_path / ('x' * 300) / 'run'}")
    assert code == 2 and "File name too long (ENAMETOOLONG)" in " ".join(err.split()) and "shorter path" in err


def test_a_full_disk_during_a_checkpoint_is_a_message_and_keeps_the_last_one(tmp_path, monkeypatch):
    import torch

    from rredcot import runlog

    real_save, calls = torch.save, []

    def save(obj, path, *a, **k):  # the second checkpoint (step 4) finds the disk full
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(runlog.torch, "save", save)
    run = tmp_path / "full"
    code, err = run_main(f"train debug=fast run_dir={run} logging.progress=false")
    said = " ".join(err.split())
    assert code == 2 and "No space left on device (ENOSPC)" in said and "resume=true" in said, said
    assert [p.name for p in runlog.checkpoints(run)] == ["step_000002"]  # the step-4 one never looks complete


@pytest.mark.parametrize(
    "code, phrase",
    [
        (errno.ENOSPC, "Free space on that disk"),
        (errno.EACCES, "Choose a directory you can write"),
        (errno.EROFS, "read-only"),
        (errno.ENOTDIR, "A file stands where a directory is needed"),
        (errno.EMFILE, "ulimit -n"),
    ],
)
def test_file_system_faults_name_the_path_the_meaning_and_the_fix(code, phrase):
    text = oserror_message(OSError(code, os.strerror(code), "/runs/x/checkpoints"))
    assert "'/runs/x/checkpoints'" in text and os.strerror(code) in text and phrase in text
    assert oserror_message(OSError(errno.ECONNRESET, "reset")) is None  # not a file-system fault: a bug, raised


def test_a_new_run_never_starts_over_files_train_writes(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own")
    (mine / "notes.txt").write_text("kept")
    code, err = run_main(f"train debug=fast run_dir={mine}")
    assert code == 2 and "already holds config.yaml, which a new run would overwrite" in " ".join(err.split())
    assert (mine / "config.yaml").read_text() == "my: own"
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "notes.txt"]  # not even a lock file left
