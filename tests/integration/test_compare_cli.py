"""`rredcot compare` through the CLI: a tiny two-seed comparison, and reports from finished runs."""

import json
import shutil

import pytest

from .conftest import cli


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "report"
    proc = cli(
        "compare",
        "--baseline",
        "grpo",
        "--seeds",
        "2",
        "--out",
        str(out),
        "debug=fast",
        "train.steps=2",
        "eval.n_samples=1",
        "eval.ks=[1]",
        "eval.extra_splits=[dev]",
    )
    return out, proc


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
    assert "paired t-test over 2 seeds" in summary["verdicts"]["rredcot"]["text"] or "difference" in proc.stdout
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
