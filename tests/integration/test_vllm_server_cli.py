"""rollout=vllm rollout.mode=server end to end through the CLI entry point: `rredcot train` against
tests/fake_vllm_server.py (a real HTTP server on 127.0.0.1; its NCCL group is a CPU queue), kept to a few tiny
steps. The run trains, pushes the weights at the start and after every optimizer step, samples by HTTP, and
logs the sampler mismatch; without a server it stops at start-up with the command to start one."""

from __future__ import annotations

import json
import socket

import pytest

from rredcot.stages import vllm_server
from tests import fake_vllm_server

from .conftest import run_main

TINY = (  # a few seconds: no warm start, 2 steps of 2 prompts x 2 completions of 12 tokens, 2 eval prompts
    "train debug=fast rollout=vllm rollout.mode=server rollout.host=127.0.0.1 train.steps=2 warmstart.enabled=false "
    "train.generation_batch_size=4 update.micro_batch_size=4 rollout.group_size=2 rollout.max_new_tokens=12 "
    "train.eval_every=0 eval.n_prompts=2 eval.n_samples=1 eval.ks=[1] logging.progress=false"
)


@pytest.fixture
def server(fake_vllm, monkeypatch):
    """A fake server of the debug=fast run's model (its weights are replaced by the trainer's first push)."""
    from rredcot.compose import load_config
    from rredcot.task.model import build_tiny, load_tokenizer

    cfg = load_config(["debug=fast"])
    served = fake_vllm_server.Server(build_tiny(cfg.model, len(load_tokenizer("builtin")), seed=1))
    transport = fake_vllm_server.Transport(served)
    monkeypatch.setattr(vllm_server, "make_transport", lambda vllm: transport)
    served.transport = transport
    yield served
    served.close()


def test_a_server_mode_run_trains_and_pushes_its_weights_after_every_step(server, tmp_path):
    run = tmp_path / "run"
    code, err = run_main(f"{TINY} rollout.port={server.port} run_dir={run}")
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # an fp32 server on the trainer's weights: the sampler and the trainer agree to float noise every step
    assert all(r["sampler/logp_diff_max"] < 1e-3 for r in steps)
    assert server.pushes == 3 and server.transport.opened == 1  # the start, then after each of the 2 steps
    assert server.served and set(server.served) <= {1, 2, 3}  # every completion from pushed weights
    assert (run / "eval.json").exists() and "mode: server" in (run / "config.yaml").read_text()


def test_without_a_server_the_run_stops_at_start_up_with_the_command_to_start_one(fake_vllm, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, err = run_main(f"{TINY} rollout.port={port} rollout.server_timeout=0 run_dir={tmp_path / 'run'}")
    assert code == 2 and "no vLLM server answers" in err and "vllm serve" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
