"""Sharded training through accelerate on CUDA (marker `gpu`): the shipped FSDP2 and DeepSpeed ZeRO configs,
on every GPU the machine has. One is enough to run each engine's code paths: rredcot/sharding.py takes its
sharded paths by what the model is (DTensor weights, a ZeRO engine), not by the world size, so on one GPU too
the no-grad passes gather the weights, checkpoints gather them (checked below: full shapes, not shards or
ZeRO-3 stubs) and ZeRO-1/2 save one optimizer partition per rank. What one GPU cannot show is ranks waiting on
each other: that is test_distributed_fsdp.py (two CPU ranks). Not run on the CPU machine (accelerate gives no
FSDP there); the CPU tests are test_distributed.py, test_distributed_fsdp.py and test_distributed_zero.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rredcot.runlog import latest_checkpoint
from rredcot.sharding import PARTITIONS

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
    ckpt = latest_checkpoint(run)
    assert_full_weights(ckpt)
    if config == "zero2.yaml":  # one optimizer partition per rank, on one GPU too (the resume above read them)
        names = sorted(p.name for p in (ckpt / PARTITIONS).glob("*.pt"))
        assert names == [f"rank_{r:05d}_of_{n:05d}.pt" for r in range(n)]


def assert_full_weights(ckpt) -> None:
    """Every saved tensor has the model's full shape (not a rank's shard, not a ZeRO-3 placeholder)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {
            k: tuple(v.shape)
            for k, v in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt)).state_dict().items()
        }
    files = list(ckpt.glob("*.safetensors"))
    assert files
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                assert tuple(st.get_slice(key).get_shape()) == shapes[key], key
