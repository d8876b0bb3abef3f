"""FSDP2 on CPU (raw fully_shard over gloo ranks: accelerate gives no FSDP without a GPU): the no-grad passes
whose counts differ per rank do not hang inside sharding.full_weights, and do without it; rredcot reads no
private FSDP state (fsdp_uneven.py hides it from rredcot's code); one process takes the same sharded paths."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO

SCRIPT = REPO / "tests" / "integration" / "fsdp_uneven.py"


def launch(mode: str, timeout: int, ranks: int = 2) -> tuple[int | None, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    try:
        p = subprocess.run(
            [*run, str(SCRIPT), mode],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        return None, str(e.stdout or "")


def test_fsdp2_uneven_no_grad_passes_do_not_hang():
    code, out = launch("wrapped", timeout=180)
    assert code == 0, out[-4000:]
    for r in (0, 1):  # both ranks, each with its own chunk count
        assert f"rank {r}: step and checkpoint state ok" in out
    assert "rank 0: sampled (2, 6)" in out and "rank 1: sampled (10, 16)" in out


def test_fsdp2_on_one_process_takes_the_sharded_paths():
    """One GPU under an FSDP2 config: the weights are DTensors, so full_weights must gather them and
    full_state must return full tensors (test_gpu_distributed.py runs this through accelerate on CUDA)."""
    code, out = launch("wrapped", timeout=180, ranks=1)
    assert code == 0, out[-4000:]
    assert "rank 0: sampled (2, 6) uneven ok" in out and "rank 0: step and checkpoint state ok" in out


@pytest.mark.slow  # the control, run with --runslow (make test-all): it waits out a collective timeout
def test_without_full_weights_the_same_passes_deadlock():
    """The control: the test above would prove nothing if uneven passes were harmless (measured: it fails
    after the 4 s collective timeout, rank 1 never finishing its sampling)."""
    code, out = launch("naive", timeout=120)
    assert code != 0  # a collective timeout (4 s) or the test's own
    assert "rank 1: sampled" not in out
