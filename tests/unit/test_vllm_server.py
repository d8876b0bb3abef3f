"""rollout=vllm rollout.mode=server against tests/fake_vllm_server.py, a real HTTP server on 127.0.0.1 in a thread
(its NCCL group is a CPU queue, the only thing stood in): the weight push before the first sample and after every
optimizer step, sampling by HTTP with per-row seeds, the re-scoring, and each way a server can be unfit or gone."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from rredcot.errors import UserError
from rredcot.registry import get
from rredcot.stages import vllm_server
from rredcot.stages.rollout import sample_rollout
from rredcot.types import Sample
from tests import fake_vllm_server

SAMPLES = [Sample("a=1, b=a+2. b=?\n", "3"), Sample("x=10, y=x*2. y=?\n", "20")]


def _other_weights(model):
    """The served model: the trainer's architecture with other weights (what the server loaded from disk)."""
    served = type(model)(model.config)
    with torch.no_grad():
        for p in served.parameters():
            p.normal_(0, 0.02)
    return served


@pytest.fixture
def serve(fake_vllm, tiny_model, monkeypatch):
    """A factory of fake servers for the tiny model; rredcot's side pushes over each one's queue."""
    servers, transports = [], {}

    def start(**opts):
        server = fake_vllm_server.Server(_other_weights(tiny_model[0]), **opts)
        servers.append(server)
        return server

    def transport(vllm):
        server = servers[-1]
        transports[server] = fake_vllm_server.Transport(server)
        return transports[server]

    monkeypatch.setattr(vllm_server, "make_transport", transport)
    start.transports = transports
    yield start
    for server in servers:
        server.close()


def _backend(model, tok, server, **opts):
    opts = {"mode": "server", "host": "127.0.0.1", "port": server.port, "server_timeout": 5, "chunk_size": 4, **opts}
    return get("rollout", "vllm")(model, tok, **opts)


def _same_weights(model, server) -> bool:
    return all(torch.equal(server.net.state_dict()[n], t) for n, t in model.state_dict().items())


def test_the_server_samples_with_the_trainers_weights_pushed_after_every_step(serve, tiny_model):
    model, tok = tiny_model
    server = serve()
    backend = _backend(model, tok, server)
    transport = serve.transports[server]
    assert transport.opened == 1 and server.pushes == 1 and _same_weights(model, server)  # before the first sample
    assert server.calls[:4] == ["init_weight_transfer_engine", "start_weight_update", "update_weights"] + [
        "finish_weight_update"
    ]
    assert server.calls[4] == "reset_prefix_cache"  # cached prefixes were computed with the old weights

    torch.manual_seed(0)
    ro = sample_rollout(backend, tok, SAMPLES, group_size=3, max_new_tokens=10, temperature=0.7)
    m = ro.completion_mask.bool()
    assert ro.completion_ids.shape[0] == 6 and server.served == [1] * 6  # one request per row, new weights
    assert torch.allclose(ro.logprobs[m], ro.sampler_logprobs[m], atol=1e-4)  # re-scored: the same weights
    torch.manual_seed(0)  # the per-request seeds come from torch's generator: a seeded run repeats itself
    assert torch.equal(
        sample_rollout(backend, tok, SAMPLES, group_size=3, max_new_tokens=10, temperature=0.7).completion_ids,
        ro.completion_ids,
    )

    with torch.no_grad():  # an optimizer step
        next(model.parameters()).add_(0.05)
    backend.sync(model)
    assert server.pushes == 2 and backend.pushes == 2 and _same_weights(model, server)
    assert transport.sent == 2 * len(list(model.parameters())) and transport.opened == 1  # one group, kept
    backend.client.close()
    assert transport.closed == 1


def test_rows_with_the_same_seed_draw_the_same_completion_in_any_batch(serve, tiny_model):
    from rredcot.stages.rollout import Sampling

    model, tok = tiny_model
    backend = _backend(model, tok, serve())
    ids = torch.tensor([tok("a=1, b=a+2. b=?\n", add_special_tokens=False)["input_ids"]] * 3)
    sampling = Sampling(max_new_tokens=8, temperature=1.0)
    three = backend.generate(ids, torch.ones_like(ids), sampling, seeds=[7, 8, 9])
    one = backend.generate(ids[1:2], torch.ones_like(ids[1:2]), sampling, seeds=[8])
    n = int(one.mask[0].sum())
    assert torch.equal(three.ids[1, :n], one.ids[0, :n])


@pytest.mark.parametrize(
    "opts, says",
    [
        ({"dev_mode": False}, "VLLM_SERVER_DEV_MODE=1"),
        ({"weight_transfer": False}, """--weight-transfer-config '{"backend": "nccl"}'"""),
        ({"logprobs": "raw_logprobs"}, "--logprobs-mode processed_logprobs"),
        ({"version": "0.27.0"}, "runs vLLM 0.27.0 and this trainer 0.31.0"),
    ],
)
def test_a_server_started_without_what_training_needs_is_refused_with_the_command(serve, tiny_model, opts, says):
    model, tok = tiny_model
    with pytest.raises(UserError, match="restart it with|same release") as e:
        _backend(model, tok, serve(**opts))
    assert says in str(e.value)


def test_a_push_that_sends_other_tensors_than_it_announced_fails_clearly(serve, tiny_model, monkeypatch):
    model, tok = tiny_model
    server = serve(wait_s=0.5)
    monkeypatch.setattr(
        fake_vllm_server.Transport, "send", lambda self, pairs: [self.server.inbox.put(t.half()) for _, t in pairs]
    )
    with pytest.raises(UserError, match=r"refused POST /update_weights \(500\)"):
        _backend(model, tok, server)


def test_a_server_that_went_away_names_the_restart_and_the_resume(serve, tiny_model):
    model, tok = tiny_model
    server = serve()
    backend = _backend(model, tok, server)
    server.close()
    with pytest.raises(UserError, match=r"stopped answering.*vllm serve.*resume=true"):
        sample_rollout(backend, tok, SAMPLES[:1], group_size=2, max_new_tokens=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_is_a_user_error_after_server_timeout_with_the_command_to_start_one(fake_vllm):
    from rredcot.compose import load_config

    port, began = _free_port(), time.monotonic()
    overrides = ["rollout=vllm", "rollout.mode=server", "rollout.host=127.0.0.1", f"rollout.port={port}"]
    with pytest.raises(UserError, match=rf"no vLLM server answers at http://127.0.0.1:{port} \(waited 0.5 s\)") as e:
        load_config([*overrides, "rollout.server_timeout=0.5"])  # at config time, before anything is written
    assert time.monotonic() - began >= 0.5
    assert "vllm serve" in str(e.value) and "rollout.host and rollout.port" in str(e.value)


def test_a_server_still_starting_is_waited_for(fake_vllm, tiny_model):
    port, servers = _free_port(), []
    later = threading.Timer(0.5, lambda: servers.append(fake_vllm_server.Server(tiny_model[0], port=port)))
    later.start()
    try:
        vllm_server.wait_for(f"http://127.0.0.1:{port}", 10)
        assert servers
    finally:
        later.join()
        for s in servers:
            s.close()
