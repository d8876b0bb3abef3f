"""Data parallel on CPU: two real ranks (torchrun, gloo), checked against one process.

`accelerate launch --cpu --num_processes 2` starts a single process, so these use torchrun; each test
asserts from the run's own record (config.yaml world_size, taken from the process group) that two ranks ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import REPO, cli

# 2 steps of 4 prompts x 4 completions; every completion logged; an odd eval set (ranks get 3 and 2 prompts)
SHORT = [
    "debug=fast",
    "logging.progress=false",
    "train.steps=2",
    "train.log_every=1",
    "train.samples_per_log=16",
    "train.eval_every=0",
    "train.save_every=0",
    "eval.n_prompts=5",
]
CASES = {
    # RREDCoT's default: forced values (uneven probe chunks per rank), dapo (global token denominator, x W)
    "rredcot": ["algo=rredcot"],
    # GRPO with per-row loss, batch-scaled rewards (a global std), 2 optimizer steps of 2 micro-batches per rank;
    # a format reward, so that groups differ (the debug model answers nothing right: GRPO would learn nothing)
    "grpo": [
        "algo=grpo",
        "update.loss_type=grpo",
        "redistribute.scale_rewards=batch",
        "update.steps_per_generation=2",
        "update.micro_batch_size=2",
        "verify.format_weight=0.5",
    ],
    # DAPO's dynamic sampling: which groups are dropped is decided on both ranks' rewards, extra batches are
    # drawn on both, and the kept groups are dealt out again (rank 1 trains groups rank 0 sampled); overlong
    # shaping in the rewards, and GSPO's sequence-level ratio over two passes
    "dynamic": [
        "algo=grpo",
        "train.dynamic_sampling=true",
        "train.max_extra_generation_batches=2",
        "verify.format_weight=0.5",
        "verify.overlong_buffer=8",
        "update.num_iterations=2",
        "update.importance_sampling_level=sequence",
    ],
}
WEIGHT_TOL = 1e-5  # float32 sums in another order (DDP's average vs one process's accumulation); measured ~3e-7


def torchrun(n: int, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node n -m rredcot ARGS`, as a user launches it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            "-m",
            "rredcot",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun rredcot {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def weights(run: Path) -> dict:
    """The newest checkpoint's weights."""
    from safetensors.torch import load_file

    return load_file(str(sorted((run / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))


def worst_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_give_the_one_process_run(tmp_path, case):
    one, two = tmp_path / "one", tmp_path / "two"
    # rredcot: the two ranks start with an empty warm-start cache (rank 0 builds it, rank 1 waits and loads it)
    cache = {"RREDCOT_CACHE": str(tmp_path / "cache")} if case == "rredcot" else {}
    proc = torchrun(2, "train", *SHORT, *CASES[case], f"run_dir={two}", env=cache)
    cli("train", *SHORT, *CASES[case], f"run_dir={one}", env=cache)

    # two ranks really ran, and wrote one run directory (rank 1 wrote nothing of its own)
    assert yaml.safe_load((two / "config.yaml").read_text())["world_size"] == 2
    assert yaml.safe_load((one / "config.yaml").read_text())["world_size"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["one", "two", *(["cache"] if cache else [])])
    if cache:  # one warm start, complete, no half-written copy (beside it: the lock its writer took)
        (entry,) = (p for p in (tmp_path / "cache" / "warmstart").iterdir() if p.suffix != ".lock")
        assert (entry / "config.json").exists()
    assert proc.stdout.count("held-out metrics") == 1  # the summary table once, from rank 0

    # the same completions (all 16 of each step: both ranks' rows, in global order) and the same rewards
    for step in (1, 2):
        a, b = lines(one / "samples" / f"step_{step:06d}.jsonl"), lines(two / "samples" / f"step_{step:06d}.jsonl")
        assert len(a) == len(b) == 16 and a == b

    # the same weights after two steps, within float tolerance
    worst = worst_difference(one, two)
    assert worst < WEIGHT_TOL, worst

    # global metrics: the gathered batch's, not rank 0's half (timings and memory differ by nature)
    ma, mb = lines(one / "metrics.jsonl"), lines(two / "metrics.jsonl")
    trained = [r for r in ma if "grad_norm" in r]
    assert len(trained) == 2 and all(r["grad_norm"] > 1e-4 for r in trained)  # not vacuous: the weights moved
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for k, v in ra.items():
            if k.startswith(("time/", "tokens/s", "memory/")) or v is None:
                continue
            assert rb[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (ra["step"], k)
    # evaluation split over ranks (3 + 2 prompts) and gathered: every prompt scored once
    ea, eb = json.loads((one / "eval.json").read_text()), json.loads((two / "eval.json").read_text())
    assert eb["final"]["n_prompts"] == 5
    assert eb["final"]["examples"] == ea["final"]["examples"]

    if case == "grpo":  # a checkpoint does not depend on the world size: the two-rank run continues in one process
        for run in (one, two):
            proc = cli("train", *SHORT, *CASES[case], "train.steps=3", f"run_dir={run}", "resume=true")
        assert "resuming on 1 process(es); the run was started on 2" in " ".join(proc.stderr.split())
        third = [[r for r in lines(run / "metrics.jsonl") if r["step"] == 3 and "loss" in r][0] for run in (one, two)]
        assert third[1]["grad_norm"] == pytest.approx(third[0]["grad_norm"], rel=1e-4)
        assert third[1]["reward/mean"] == third[0]["reward/mean"]
        assert worst_difference(one, two) < WEIGHT_TOL


def test_uneven_world_is_refused_at_config_time(tmp_path):
    """3 ranks cannot split 4 prompt groups: a one-paragraph error naming the numbers to change, nothing written."""
    env = {"WORLD_SIZE": "3"}  # what a launcher sets; the check runs before any process group
    proc = cli("train", "debug=fast", f"run_dir={tmp_path / 'r'}", check=False, env=env)
    assert proc.returncode == 2
    assert "3 processes" in proc.stderr and "4 prompts" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
