"""Sharded training through accelerate on CUDA (marker `gpu`): the shipped FSDP2 and DeepSpeed ZeRO configs,
on every GPU the machine has (one is enough to run each engine's code paths: sharding, the full-weight
no-grad passes, checkpoints of sharded state, a resume). Not run on the CPU machine (accelerate gives no FSDP
there and DeepSpeed needs CUDA); the CPU tests are test_distributed.py and test_distributed_fsdp.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO

pytestmark = pytest.mark.gpu
ARGS = [
    "debug=fast",
    "logging.progress=false",
    "train.steps=4",
    "train.save_every=2",
    "eval.n_prompts=5",
    "device=cuda",
]


def accelerate(config: str, *args: str) -> subprocess.CompletedProcess:
    n = torch.cuda.device_count()
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            f"conf/accelerate/{config}",
            "--num_processes",
            str(n),
            "-m",
            "rredcot",
            "train",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.parametrize("config", ["fsdp2.yaml", "zero2.yaml", "zero3.yaml"])
def test_sharded_configs_train_checkpoint_and_resume(tmp_path, config):
    if config.startswith("zero"):
        pytest.importorskip("deepspeed")
    n = torch.cuda.device_count()
    batch = [f"train.generation_batch_size={4 * 4 * n}"]  # 4 prompts per rank
    run = tmp_path / "run"
    accelerate(config, *ARGS, *batch, "train.steps=2", f"run_dir={run}")
    accelerate(config, *ARGS, *batch, f"run_dir={run}", "resume=true")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3, 4]
    assert json.loads((run / "eval.json").read_text())["final"]["n_prompts"] == 5
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["world_size"] == n
