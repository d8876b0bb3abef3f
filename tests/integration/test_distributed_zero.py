"""DeepSpeed ZeRO-2 on CPU (two gloo ranks, DeepSpeed's CPU accelerator): a checkpoint holds every rank's
optimizer partition and a resume gives each rank its own back (zero2_resume.py). Needs deepspeed
(`pip install 'rredcot[deepspeed]'`; it installs and runs without CUDA): skipped without it.
test_gpu_distributed.py runs zero2.yaml through accelerate on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO


def test_zero2_checkpoint_resumes_each_ranks_partition(tmp_path):
    pytest.importorskip("deepspeed")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    script = REPO / "tests" / "integration" / "zero2_resume.py"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    p = subprocess.run([*run, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "rank 0: zero2 resume ok" in out and "rank 1: zero2 resume ok" in out
