"""`rredcot compare` through the CLI: a tiny two-seed comparison, and reports from finished runs."""

import json
import shutil
import subprocess

import pytest

from .conftest import built_once, cli


@pytest.fixture(scope="session")
def tiny_compare(tmp_path_factory):
    """A two-seed compare of debug-size runs (four trains), built once for the session: (its --out, its process)."""

    def build(root):
        proc = cli("compare", "--baseline", "grpo", "--seeds", "2", "--out", str(root / "report"), *TINY)
        (root / "proc.json").write_text(json.dumps([proc.returncode, proc.stdout, proc.stderr]))

    root = built_once(tmp_path_factory, "tiny_compare", build)
    code, out, err = json.loads((root / "proc.json").read_text())
    return root / "report", subprocess.CompletedProcess(["rredcot", "compare"], code, out, err)


def test_report_files_exist_and_numbers_match_the_runs(tiny_compare):
    out, proc = tiny_compare
    for name in ("report.md", "report.html", "accuracy.png", "training.png", "summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rows"]) == {"rredcot", "grpo"} and summary["baseline"] == "grpo"
    for label in ("rredcot", "grpo"):
        finals = [json.loads((out / label / f"seed{s}" / "eval.json").read_text())["final"]["accuracy"] for s in (0, 1)]
        assert summary["rows"][label]["accuracy"] == pytest.approx(sum(finals) / 2)
        assert summary["rows"][label]["seeds"] == [0, 1]
    text = summary["verdicts"]["rredcot"]["text"]
    assert "paired t-test over 2 seeds" in text or "on each of 2 seeds; p = n/a" in text  # n/a: no variance
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table" in html


def test_report_from_finished_runs(tiny_compare, tmp_path):
    out, _ = tiny_compare
    runs = [str(out / m / f"seed{s}") for m in ("rredcot", "grpo") for s in (0, 1)]
    cli("compare", "--runs", *runs, "--out", str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["rows"].keys() == {"rredcot", "grpo"}


def test_report_on_an_extra_split(tiny_compare, tmp_path):
    # the runs were evaluated on test (eval.split) and dev (eval.extra_splits): --split dev reports dev
    out, _ = tiny_compare
    runs = [str(out / m / f"seed{s}") for m in ("rredcot", "grpo") for s in (0, 1)]
    cli("compare", "--runs", *runs, "--out", str(tmp_path / "dev"), "--split", "dev")
    summary = json.loads((tmp_path / "dev" / "summary.json").read_text())
    finals = [
        json.loads((out / "grpo" / f"seed{s}" / "eval.json").read_text())["splits"]["dev"]["final"] for s in (0, 1)
    ]
    assert summary["split"] == "dev" and summary["rows"]["grpo"]["accuracy"] == pytest.approx(
        sum(f["accuracy"] for f in finals) / 2
    )
    assert "'dev' split" in (tmp_path / "dev" / "report.md").read_text()
    proc = cli("compare", "--runs", *runs, "--out", str(tmp_path / "train"), "--split", "train", check=False)
    assert proc.returncode == 2 and "the held-out splits are dev and test" in proc.stderr


def test_evaluating_more_does_not_change_training(tiny_compare, fast_run):
    # same config and seed as fast_run except the extra dev evaluations (and fast_run trained the warm start,
    # these runs loaded it cached): evaluation samples on a forked RNG and the RL stage is reseeded after the
    # warm start, so the first two training steps are identical (step 2 samples from the policy step 1 updated)
    from rredcot.runlog import read_metrics

    out, _ = tiny_compare
    a = [r for r in read_metrics(out / "rredcot" / "seed0") if "loss" in r][:2]
    b = [r for r in read_metrics(fast_run) if "loss" in r][:2]
    for ra, rb in zip(a, b):
        for key in ("reward/mean", "completion/mean_length", "entropy", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4), key


def test_runs_that_are_missing_incomplete_or_of_another_task(tiny_compare, tmp_path):
    out, _ = tiny_compare
    good = str(out / "grpo" / "seed0")
    proc = cli("compare", "--runs", good, str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    partial = tmp_path / "partial"
    shutil.copytree(out / "rredcot" / "seed0", partial)
    (partial / "eval.json").unlink()
    proc = cli("compare", "--runs", good, str(partial), check=False)
    assert proc.returncode == 2 and "incomplete" in proc.stderr
    other = tmp_path / "other"
    shutil.copytree(out / "rredcot" / "seed0", other)
    cfg = (other / "config.yaml").read_text().replace("steps: 4\n  max_value", "steps: 6\n  max_value")
    (other / "config.yaml").write_text(cfg)
    proc = cli("compare", "--runs", good, str(other), check=False)
    assert proc.returncode == 2 and "different task" in proc.stderr


def test_unknown_baseline():
    proc = cli("compare", "--baseline", "ppo", "debug=fast", check=False)
    assert proc.returncode == 2 and "grpo" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("damage", ["{}", '{"final": {}}', "not json"])
def test_a_malformed_run_is_a_message_not_a_traceback(tiny_compare, tmp_path, damage):
    # `rredcot eval` once replaced eval.json, and compare then died with KeyError: 'final'
    out, _ = tiny_compare
    bad = tmp_path / "bad"
    shutil.copytree(out / "grpo" / "seed0", bad)
    (bad / "eval.json").write_text(damage)
    proc = cli("compare", "--runs", str(out / "rredcot" / "seed0"), str(bad), "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "malformed" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_eval_then_compare_still_works(tiny_compare, tmp_path):
    out, _ = tiny_compare
    run = tmp_path / "run"
    shutil.copytree(out / "grpo" / "seed0", run)
    cli("eval", f"checkpoint={run}", "eval.n_prompts=4")
    cli("compare", "--runs", str(out / "rredcot" / "seed0"), str(run), "--out", str(tmp_path / "r"))


# ---- issue 21: one run counted twice, p-values from no variance, a user's files, Ctrl-C and continuing --------

RUNS = [f"{m}/seed{s}" for m in ("rredcot", "grpo") for s in (0, 1)]
TINY = ["debug=fast", "train.steps=2", "eval.n_samples=1", "eval.ks=[1]", "eval.extra_splits=[dev]"]


def _hashes(root) -> dict:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _set_accuracy(run, acc: float) -> None:
    result = json.loads((run / "eval.json").read_text())
    result["final"]["accuracy"] = acc
    (run / "eval.json").write_text(json.dumps(result))


def test_one_run_passed_twice_is_refused(tiny_compare, tmp_path):
    # `--runs W W G G` once reported a paired t-test over 2 "seeds" with +-0.0 intervals
    out, _ = tiny_compare
    w, g = str(out / "rredcot" / "seed0"), str(out / "grpo" / "seed0")
    proc = cli("compare", "--runs", w, w, g, g, "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "names one run directory twice" in proc.stderr and w in proc.stderr
    assert not (tmp_path / "r").exists()
    copy = tmp_path / "copy"
    shutil.copytree(w, copy)
    proc = cli("compare", "--runs", w, str(copy), g, "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "are both rredcot with seed 0" in proc.stderr and "Traceback" not in proc.stderr


def test_differences_without_variance_print_no_p_value(tiny_compare, tmp_path):
    # every seed 20 points apart (0.3 - 0.1 and 0.5 - 0.3 differ by float noise): a t-test would say p = 0.000
    out, _ = tiny_compare
    runs = []
    for name, acc in zip(RUNS, (0.3, 0.5, 0.1, 0.3)):
        shutil.copytree(out / name, tmp_path / name)
        _set_accuracy(tmp_path / name, acc)
        runs.append(str(tmp_path / name))
    said = " ".join(cli("compare", "--runs", *runs, "--out", str(tmp_path / "r")).stdout.split())
    assert "p = n/a (all seeds differ by the same amount; no variance to test)" in said and "p = 0.0" not in said
    summary = json.loads((tmp_path / "r" / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    v = summary["verdicts"]["rredcot"]
    assert v["p"] is None and v["ci"] is None and v["t"] is None and "no variance" in v["undefined"]
    for name in ("report.md", "report.html"):
        text = (tmp_path / "r" / name).read_text()
        assert "p = n/a" in text and "p = 0.0" not in text and "± 0.0" not in text


def test_a_report_file_of_the_user_is_never_overwritten(tiny_compare, tmp_path):
    out, _ = tiny_compare
    runs, report = [str(out / r) for r in RUNS], tmp_path / "r"
    report.mkdir()
    (report / "report.md").write_text("my notes")
    proc = cli("compare", "--runs", *runs, "--out", str(report), check=False)
    assert proc.returncode == 2 and "report.md" in proc.stderr and "another --out" in proc.stderr
    assert (report / "report.md").read_text() == "my notes" and sorted(p.name for p in report.iterdir()) == [
        "report.md"
    ]
    (report / "report.md").unlink()
    cli("compare", "--runs", *runs, "--out", str(report))
    cli("compare", "--runs", *runs, "--out", str(report))  # its own, unchanged report: replaced
    (report / "summary.json").write_text("{}")  # edited since: the user's now
    mine = _hashes(report)
    proc = cli("compare", "--runs", *runs, "--out", str(report), check=False)
    assert proc.returncode == 2 and "summary.json" in proc.stderr and _hashes(report) == mine


def test_a_rerun_keeps_finished_seeds_and_refuses_other_overrides(tiny_compare, tmp_path):
    out, _ = tiny_compare
    again = tmp_path / "again"
    shutil.copytree(out, again)
    runs = {r: _hashes(again / r) for r in RUNS}
    proc = cli("compare", "--seeds", "2", "--out", str(again), *TINY)
    assert "keeping rredcot seed 0, grpo seed 0, rredcot seed 1, grpo seed 1 (finished)" in proc.stdout
    assert {r: _hashes(again / r) for r in RUNS} == runs  # nothing retrained
    proc = cli("compare", "--seeds", "2", "--out", str(again), *TINY, "train.steps=3", check=False)
    assert proc.returncode == 2 and "train.steps: 2 -> 3" in proc.stderr and "another --out" in proc.stderr


def test_a_run_that_stopped_before_its_first_checkpoint_is_restarted_only_if_nothing_else_is_there(
    tiny_compare, tmp_path
):
    out, _ = tiny_compare
    again = tmp_path / "again"
    shutil.copytree(out, again)
    dead = again / "grpo" / "seed1"  # as a run killed before its first checkpoint leaves it
    (dead / "eval.json").unlink()
    shutil.rmtree(dead / "checkpoints")
    (dead / "notes.txt").write_text("mine")
    proc = cli("compare", "--seeds", "2", "--out", str(again), *TINY, check=False)
    assert proc.returncode == 2 and "notes.txt" in proc.stderr and (dead / "notes.txt").read_text() == "mine"
    (dead / "notes.txt").unlink()
    kept = {r: _hashes(again / r) for r in RUNS[:3]}
    proc = cli("compare", "--seeds", "2", "--out", str(again), *TINY)
    assert "restarting grpo seed 1 (stopped before its first checkpoint)" in proc.stdout
    assert (dead / "eval.json").exists() and {r: _hashes(again / r) for r in RUNS[:3]} == kept


@pytest.mark.slow  # two real trains (~65 s on 2 busy cores); its cheap part: test_compare_safety.py
def test_ctrl_c_checkpoints_the_training_seed_and_the_same_command_continues(fast_run, tmp_path):
    # Ctrl-C once killed the child 0.25 s later (no checkpoint), and a rerun could not continue
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO

    out = tmp_path / "cmp"
    shutil.copytree(fast_run, out / "rredcot" / "seed0")  # seed 0 of the method, finished: `debug=fast` seed 0
    kept = _hashes(out / "rredcot" / "seed0")
    args = ["compare", "--seeds", "1", "--out", str(out), "debug=fast"]
    proc = subprocess.Popen(  # its own group, as a terminal's foreground job: Ctrl-C goes to the whole group
        [sys.executable, "-m", "rredcot", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200"),
    )
    run, deadline = out / "grpo" / "seed0", time.time() + 300
    while not (run / "samples" / "step_000001.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # in training: 4 steps, so the stop lands before the last one
    text = " ".join(proc.communicate(timeout=300)[0].split())
    assert proc.returncode == 130 and f"--out {out}" in text and "Traceback" not in text, text[-3000:]
    assert "grpo seed 0 finishes its step and saves a checkpoint" in text
    assert (
        (run / "checkpoints").is_dir()
        and any((run / "checkpoints").glob("step_*"))
        and not (run / "eval.json").exists()
    )
    proc = cli(*args)
    assert "keeping rredcot seed 0 (finished)" in proc.stdout and "resuming grpo seed 0" in proc.stdout
    assert (run / "eval.json").exists() and (run / "resumes.jsonl").exists() and (out / "report.md").exists()
    assert _hashes(out / "rredcot" / "seed0") == kept
