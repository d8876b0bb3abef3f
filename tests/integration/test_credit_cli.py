"""RREDCoT through the CLI: training with each credit estimator, and `rredcot credit`."""

import json

import pytest

from .conftest import cli


@pytest.mark.parametrize("algo", ["rredcot", "mc", "attention", "gradient"])
def test_train_with_each_estimator(algo, tmp_path):
    run = tmp_path / algo
    extra = ["redistribute.samples=2"] if algo == "mc" else []
    cli("train", "debug=fast", f"algo={algo}", "train.steps=2", f"run_dir={run}", "logging.progress=false", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "reward/mean" in line]
    assert len(rows) == 2 and rows[0]["segments/per_trace"] >= 1
    if algo in ("rredcot", "mc"):
        for key in (
            "credit/mean",
            "credit/std",
            "credit/frac_pos_in_wrong",
            "credit/frac_neg_in_right",
            "value/start_mean",
        ):
            assert key in rows[0], key
    if algo == "rredcot":
        assert rows[0]["credit/probe_tokens_per_trace"] > 0


def test_default_algorithm_is_rredcot():
    out = cli("config", "show").stdout
    assert "name: rredcot" in out and "name: hybrid" in out


def test_credit_command_against_mc(fast_run, tmp_path):
    out = tmp_path / "credit"
    proc = cli(
        "credit",
        f"checkpoint={fast_run}",
        "debug=fast",
        "credit.against=mc",
        "credit.prompts=2",
        "credit.mc_samples=2",
        "credit.segmenters=[fixed,newline]",
        f"run_dir={out}",
    )
    result = json.loads((out / "credit.json").read_text())
    assert set(result["estimators"]) == {"rredcot", "attention", "gradient", "uniform"}
    assert {"seconds", "forward_tokens", "generated_tokens"} <= set(result["estimators"]["rredcot"]["cost"])
    assert (
        result["mc"]["cost"]["generated_tokens"] > 0
        and result["estimators"]["rredcot"]["cost"]["generated_tokens"] == 0
    )
    assert set(result["segmenters"]) == {"fixed", "newline"}
    page = (out / "credit.html").read_text()
    assert page.startswith("<!doctype html>") and "credit" in page and "background:rgba" in page
    assert "against Monte Carlo" in proc.stdout
    assert (out / "credit.svg").read_text().startswith("<svg")


def test_credit_rejects_an_unknown_reference(fast_run, tmp_path):
    proc = cli(
        "credit", f"checkpoint={fast_run}", "debug=fast", "credit.against=oracle", f"run_dir={tmp_path}", check=False
    )
    assert proc.returncode == 2 and "only reference is mc" in proc.stderr


@pytest.mark.parametrize("algo, how", [("rredcot", "softmax"), ("verdict", "positive"), ("mc", "signed")])
def test_reweight_trains_end_to_end_with_each_value_estimator(algo, how, tmp_path):
    # mode=reweight (GRPO's advantage re-weighted by sigma) through the real CLI, with every value estimator
    run = tmp_path / algo
    extra = ["redistribute.samples=2"] if algo == "mc" else []
    cli(
        "train",
        "debug=fast",
        f"algo={algo}",
        "redistribute.mode=reweight",
        f"redistribute.sigma={how}",
        "train.steps=2",
        f"run_dir={run}",
        "logging.progress=false",
        *extra,
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "reward/mean" in line]
    assert len(rows) == 2 and all(r["credit/sigma_min"] <= 1.0 <= r["credit/sigma_max"] for r in rows)
    assert json.loads((run / "eval.json").read_text())["steps"] == 2


def test_grpo_vps_trains_and_is_in_the_credit_table(tmp_path):
    run = tmp_path / "vps"
    cli("train", "debug=fast", "algo=vps", "train.steps=2", f"run_dir={run}", "logging.progress=false")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "reward/mean" in line]
    assert len(rows) == 2 and rows[0]["credit/probe_tokens_per_trace"] > 0
    proc = cli("credit", f"checkpoint={run}", "credit.estimators=[vps,uniform]", "credit.prompts=1")
    assert "vps" in proc.stdout


def test_the_reference_solution_bank_trains_and_is_in_the_credit_table(tmp_path):
    run = tmp_path / "bank"
    cli("train", "debug=fast", "redistribute=reference", "train.steps=2", f"run_dir={run}", "logging.progress=false")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "reward/mean" in line]
    # every built-in problem carries its worked solution, so every group has a bank
    assert len(rows) == 2 and all(r["credit/bank_groups_frac"] == 1.0 for r in rows)
    assert rows[0]["credit/probe_tokens_per_trace"] > 0
    cli("credit", f"checkpoint={run}", "credit.prompts=1")
    report = json.loads((run / "credit" / "credit.json").read_text())
    assert report["redistribute"] == "reference" and report["stats"]["credit/bank_groups_frac"] == 1.0
