"""scripts/slurm/: what --dry-run prints, per-task expansion of SLURM variables, and the time-limit path
for real on CPU (a fake `scontrol` and `srun` on PATH; torchrun with two gloo ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import REPO

SLURM = REPO / "scripts" / "slurm"


def shims(tmp_path: Path) -> Path:
    """A bin/ with a fake scontrol (hostnames of a node list; `requeue` logged) and srun (runs its command
    once per node here, with that node's SLURM_NODEID, the way srun starts one task per node)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ $1 == show ]]; then printf "gpu-node-07\\ngpu-node-08\\n"; exit 0; fi\n'
        f'echo "$@" >> {tmp_path}/scontrol.log\n'
    )
    (bin_ / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "while [[ $1 == --* && $1 != --kill-on-bad-exit=1 ]]; do shift 2; done; shift\n"
        'for node in 0 1; do SLURM_NODEID=$node "$@"; done\n'
    )
    for f in bin_.iterdir():
        f.chmod(0o755)
    return bin_


def script(name: str, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_CONFIG", "GPUS_PER_NODE"))}
    return subprocess.run(
        ["bash", str(SLURM / name), *args],
        cwd=REPO,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


def test_one_node_dry_run_prints_the_launch(tmp_path):
    run = tmp_path / "run"
    out = script(
        "one_node.sbatch",
        "--dry-run",
        str(run),
        "+exp=gsm8k",
        "optim.lr=1e-6",
        env={"SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "77"},
    ).stdout
    assert "1 node(s) x 4 GPU(s)" in out
    assert (
        f"torch.distributed.run --nproc_per_node 4 --standalone -m rredcot train run_dir={run} +exp=gsm8k optim.lr=1e-6"
        in out
    )
    assert "resume=true" not in out and "scontrol requeue 77" in out
    assert not run.exists()  # a dry run touches nothing
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")  # a run is there: the (requeued) job resumes it
    out = script("one_node.sbatch", "--dry-run", str(run), env={"GPUS_PER_NODE": "2"}).stdout
    assert f"run_dir={run} resume=true" in out
    out = script(
        "one_node.sbatch",
        "--dry-run",
        str(run),
        env={"ACCELERATE_CONFIG": "conf/accelerate/fsdp2.yaml", "GPUS_PER_NODE": "8"},
    ).stdout
    assert "accelerate.commands.launch --config_file conf/accelerate/fsdp2.yaml --num_processes 8 -m rredcot" in out


def test_multi_node_dry_run_leaves_per_task_variables_to_each_task(tmp_path):
    env = {
        "PATH": f"{shims(tmp_path)}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_JOB_ID": "91",
    }
    out = script("multi_node.sbatch", "--dry-run", "runs/m", "+exp=gsm8k", env=env).stdout
    assert "srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c '" in out
    assert "--nnodes 2 --rdzv_id 91 --rdzv_backend c10d --rdzv_endpoint gpu-node-07:29500" in out
    assert '--local_addr "$(hostname)"' in out  # single-quoted: expanded by each task, not the batch host
    out = script(
        "multi_node.sbatch", "--dry-run", "runs/m", env={**env, "ACCELERATE_CONFIG": "conf/accelerate/zero3.yaml"}
    ).stdout
    assert "--num_processes 16 --num_machines 2 --rdzv_backend c10d --main_process_ip gpu-node-07" in out
    assert '--machine_rank "$SLURM_NODEID"' in out


def test_each_task_expands_its_own_node_rank(tmp_path):
    """Run for real with srun faked as two tasks and `echo` as python: every node gets its own rank."""
    env = {
        "PATH": f"{shims(tmp_path)}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "GPUS_PER_NODE": "8",
        "SLURM_JOB_ID": "5",
        "PYTHON": "echo",
        "ACCELERATE_CONFIG": "conf/accelerate/fsdp2.yaml",
    }
    proc = script("multi_node.sbatch", str(tmp_path / "run"), env=env)
    assert proc.returncode == 0, proc.stderr
    ranks = [
        line.split("--machine_rank ")[1].split()[0] for line in proc.stdout.splitlines() if "--machine_rank" in line
    ]
    assert ranks == ["0", "1"]


def test_usage_errors_say_what_to_pass():
    proc = script("one_node.sbatch")
    assert proc.returncode != 0 and "RUN_DIR" in proc.stderr


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, limit: float = 300) -> None:
    end = time.time() + limit
    while time.time() < end:
        rows = (
            [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            if (run / "metrics.jsonl").exists()
            else []
        )
        if any(r["step"] >= step and "reward/mean" in r for r in rows):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {limit} s")


def test_time_limit_checkpoints_requeues_and_resumes(tmp_path):
    """The job's USR1 (sent before the wall time) -> RUN/STOP -> both ranks stop after the step in progress,
    rank 0 checkpoints -> scontrol requeue; the requeued job resumes the same run directory and finishes."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{shims(tmp_path)}:{os.environ['PATH']}",
        GPUS_PER_NODE="2",
        SLURM_JOB_ID="4242",
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    args = [
        "bash",
        str(SLURM / "one_node.sbatch"),
        str(run),
        "debug=fast",
        "logging.progress=false",
        "train.steps=6",
        "train.eval_every=0",
        "train.save_every=0",
        "eval.n_prompts=4",
    ]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(run, 1, proc)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@900` delivers to the batch shell
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text()
    (ckpt,) = sorted((run / "checkpoints").glob("step_*"))
    stopped_at = int(ckpt.name.split("_")[1])
    assert 1 <= stopped_at < 6 and not (run / "STOP").exists() and not (run / "eval.json").exists()

    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # the requeued job
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "has finished" in again.stdout
    resumes = [json.loads(x) for x in (run / "resumes.jsonl").read_text().splitlines()]
    assert [r["from"] for r in resumes] == [ckpt.name]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s > 0][:6] == list(range(1, 7))  # every step once, across the two jobs
    assert json.loads((run / "eval.json").read_text())["steps"] == 6


@pytest.mark.parametrize("name", ["one_node.sbatch", "multi_node.sbatch"])
def test_sbatch_headers_ask_for_the_signal_and_requeue(name):
    text = (SLURM / name).read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
