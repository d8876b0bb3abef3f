"""Statistics for `compare`, against textbook values; method labels for same-estimator runs."""

import math
from pathlib import Path

import pytest

from rredcot.runs import Run, group_runs
from rredcot.stats import mean_ci, paired_t, t_quantile_975, t_two_sided_p


@pytest.mark.parametrize("df, q", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)])
def test_t_quantiles(df, q):
    assert t_quantile_975(df) == pytest.approx(q, abs=1e-3)


def test_t_p_value():
    assert t_two_sided_p(2.228, 10) == pytest.approx(0.05, abs=1e-3)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)


def test_mean_ci():
    # [1, 2, 3]: mean 2, sd 1, half-width 4.303 * 1 / sqrt(3) = 2.484
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert math.isnan(mean_ci([5.0])[1])


def test_paired_t():
    # differences [.1, .05, .05]: mean .0667, sd .02887, t = .0667 / (.02887 / sqrt 3) = 4.0, df 2 -> p = .0572
    t = paired_t([0.9, 0.8, 0.85], [0.8, 0.75, 0.8])
    assert t["t"] == pytest.approx(4.0) and t["p"] == pytest.approx(0.0572, abs=1e-3) and t["n"] == 3


def test_no_p_value_or_interval_from_zero_variance():
    # 0.3 - 0.1 and 0.5 - 0.3 differ by float noise (1e-17): a t-test on them once said t ~ 1e16, p = 0.000
    t = paired_t([0.3, 0.5, 0.7], [0.1, 0.3, 0.5])
    assert t["diff"] == pytest.approx(0.2) and t["n"] == 3
    assert math.isnan(t["p"]) and math.isnan(t["ci"]) and math.isnan(t["t"])
    assert t["undefined"] == "all seeds differ by the same amount; no variance to test"
    assert "same on every seed" in paired_t([0.4, 0.6], [0.4, 0.6])["undefined"]
    assert paired_t([0.9, 0.8, 0.85], [0.8, 0.75, 0.8])["undefined"] is None
    assert math.isnan(mean_ci([0.4, 0.4, 0.4])[1])  # equal seeds: no ± 0.0


def test_one_method_and_seed_twice_is_refused():
    from rredcot.errors import UserError

    with pytest.raises(UserError, match="both grpo with seed 0"):
        group_runs([_run("uniform", 0), _run("uniform", 0), _run("rredcot", 0)])


def _run(name, seed, **redistribute):
    cfg = {
        "seed": seed,
        "task": {"name": "builtin", "steps": 4},
        "segment": {"name": "hybrid"},
        "redistribute": {"name": name, **redistribute},
        "train": {"generation_batch_size": 8},
    }
    return Run(Path(f"/runs/{name}{seed}"), cfg, [], {"final": {"accuracy": 0.5, "pass@1": 0.5}})


def test_same_estimator_runs_are_told_apart_by_their_settings():
    groups = group_runs([_run("rredcot", 0, mode="mixed"), _run("rredcot", 0, mode="return_to_go"), _run("uniform", 0)])
    assert set(groups) == {"rredcot redistribute.mode=mixed", "rredcot redistribute.mode=return_to_go", "grpo"}


def test_compare_labels_name_the_segmenter_not_its_options():
    # runs differ in segment.name; size/max_tokens differ only because each segmenter has its own options
    from rredcot.runs import _tells_apart

    settings = [
        {"segment.name": "hybrid", "segment.max_tokens": 64, "segment.size": None},
        {"segment.name": "fixed", "segment.max_tokens": 0, "segment.size": 16},
        {"segment.name": "fixed", "segment.max_tokens": 0, "segment.size": 8},
    ]
    differ = ["segment.max_tokens", "segment.name", "segment.size"]
    assert [k for k in differ if _tells_apart(k, differ, settings)] == ["segment.name", "segment.size"]


def test_runs_that_differ_outside_segment_and_redistribute_are_not_averaged_as_seeds():
    # the same estimator at two learning rates (or with a lagged critic) is two methods, not two seeds;
    # the seed, the run directory and logging settings never tell methods apart
    a, b = _run("uniform", 0), _run("uniform", 1)
    a.config["optim"], b.config["optim"] = {"lr": 2e-4}, {"lr": 5e-5}
    c = _run("rredcot", 0)
    c.config.update(
        run_dir="/x",
        logging={"progress": False},
        train={"generation_batch_size": 8, "critic_lag": 10, "eval_every": 25},
    )
    d = _run("rredcot", 1)
    d.config["train"]["critic_lag"] = 0
    groups = group_runs([a, b, c, d])
    assert set(groups) == {
        "grpo optim.lr=0.0002",
        "grpo optim.lr=5e-05",
        "rredcot train.critic_lag=10",
        "rredcot train.critic_lag=0",
    }


def test_a_key_that_only_newer_runs_have_does_not_split_a_method():
    # runs made before redistribute.solution_weight existed are the same method as runs that carry its default
    old, new = _run("rredcot", 0, mode="reweight"), _run("rredcot", 1, mode="reweight", solution_weight=0.0)
    groups = group_runs([old, new, _run("uniform", 0)])
    assert set(groups) == {"rredcot", "grpo"} and len(groups["rredcot"]) == 2
    # where runs that have it differ in it, a run without it cannot be placed: it is labelled None
    other = _run("rredcot", 2, mode="reweight", solution_weight=0.5)
    assert "rredcot redistribute.solution_weight=None" in group_runs([old, new, other, _run("uniform", 0)])
