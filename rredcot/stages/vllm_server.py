"""rollout=vllm rollout.mode=server: a vLLM server on GPUs of its own samples; the trainer pushes its weights
into it after every optimizer step and asks for completions over HTTP.

The server is vLLM's own, started as TRL 1.16 starts it (trl/scripts/vllm_serve.py, whose `trl vllm-serve`
now only runs this command):

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --weight-transfer-config '{"backend": "nccl"}' \
        --logprobs-mode processed_logprobs

and this module speaks TRL 1.16's client protocol (trl/generation/vllm_client.py VLLMClient: check_server,
init_communicator, update_named_params, reset_prefix_cache, close_communicator; TRL's older `trl vllm-serve`
server had routes of its own, gone from 1.16). Read against the server's routes in vLLM 0.22.0, 0.31.0 and 0.33.0
(entrypoints/serve/.../rlhf/api_router.py, dev mode only): control over HTTP (/health, /version, /v1/models,
/server_info, /get_world_size, /init_weight_transfer_engine, /start_weight_update, /update_weights,
/finish_weight_update, /reset_prefix_cache, /v1/completions), the tensors over an NCCL group the trainer joins
as rank 0 (vLLM's NCCL weight-transfer engine; `Transport` below, which the tests replace by a CPU queue).
Only the trainer's rank 0 pushes; every rank asks for its own rows.
"""

from __future__ import annotations

import atexit
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Protocol

import torch

from rredcot import collectives, sharding
from rredcot.errors import UserError, brief
from rredcot.stages.rollout import Generations, RolloutBackend, Sampling, stop_ids
from rredcot.stages.vllm_common import FilterNote, generations, merged_weights, request_seeds

SERVE = (
    """VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --weight-transfer-config '{"backend": "nccl"}' """
    "--logprobs-mode processed_logprobs"
)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # NCCL needs the same network anyway


class Transport(Protocol):
    """The weight channel: the trainer's end of the group the server's workers join."""

    init_fields: dict  # what this vLLM's init_info / update_info carry besides the names (see NcclTransport)
    update_fields: dict

    def address(self) -> str: ...  # where the workers reach the trainer

    def open(self, init_info: dict) -> None: ...  # blocks until the workers have joined

    def send(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None: ...  # in the order announced

    def close(self) -> None: ...


class NcclTransport:
    """vLLM's NCCL weight-transfer engine, trainer side, as TRL 1.16 drives it: vLLM 0.28.0 replaced
    NCCLWeightTransferEngine.trainer_init / trainer_send_weights (0.22.0-0.27) by nccl_common.trainer_init and
    packed_tensor.packed_nccl_broadcast_producer, and moved `packed` from the update info to the init info."""

    def __init__(self, version: str):
        from packaging.version import Version

        self.stateful, self.group = Version(version) >= Version("0.28.0"), None
        self.init_fields, self.update_fields = ({"packed": True}, {}) if self.stateful else ({}, {"packed": True})

    def address(self) -> str:
        from vllm.utils.network_utils import get_ip

        return get_ip()

    def open(self, init_info: dict) -> None:
        if self.stateful:
            from vllm.distributed.weight_transfer.nccl_common import trainer_init
        else:
            from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

            trainer_init = NCCLWeightTransferEngine.trainer_init
        self.group = trainer_init(init_info)  # a PyNcclCommunicator on the current CUDA device

    def send(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        pairs = ((n, t if t.is_cuda else t.cuda()) for n, t in pairs)
        if self.stateful:
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            packed_nccl_broadcast_producer(iterator=pairs, group=self.group, src=0, post_iter_func=lambda kv: kv[1])
        else:
            from vllm.distributed.weight_transfer.nccl_engine import (
                NCCLTrainerSendWeightsArgs,
                NCCLWeightTransferEngine,
            )

            args = NCCLTrainerSendWeightsArgs(group=self.group, packed=True)
            NCCLWeightTransferEngine.trainer_send_weights(iterator=pairs, trainer_args=args)

    def close(self) -> None:
        if self.group is not None:  # TRL's close_communicator: the group's socket would keep the server waiting
            self.group.group.store = self.group.group.socket = None
            self.group = None


def make_transport(vllm) -> Transport:
    return NcclTransport(vllm.__version__)


class Client:
    """HTTP to the server (the stdlib: no client library to pin) and its weight channel."""

    def __init__(self, url: str, transport: Transport, group_port: int):
        self.url, self.transport, self.group_port, self.model, self.opened = url, transport, group_port, None, False

    def _call(self, method: str, path: str, body: dict | None = None, missing_ok: bool = False):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with _NO_PROXY.open(req) as r:
                text = r.read()
        except urllib.error.HTTPError as e:
            if missing_ok and e.code == 404:
                return None
            raise UserError(
                f"The vLLM server at {self.url} refused {method} {path} ({e.code}): "
                f"{brief(e.read().decode(errors='replace'), 400)}"
            ) from None
        except OSError as e:  # refused, reset, unreachable, a timeout
            raise UserError(
                f"The vLLM server at {self.url} stopped answering ({method} {path}: {e}). Restart it ({SERVE}) "
                "and continue the run with `rredcot train resume=true run_dir=RUN`."
            ) from None
        return json.loads(text) if text.strip() else None  # /reset_prefix_cache answered nothing before 0.26.0

    def check(self, local_version: str) -> None:
        """The server is vLLM of this release, with the dev endpoints, a weight-transfer engine and processed
        log-probs (TRL 1.16's `trl vllm-serve` imposes the same three)."""
        server = self._call("GET", "/version")["version"]
        if _release(server) != _release(local_version):  # the push's wire format changed in 0.28.0 (NcclTransport)
            raise UserError(
                f"The vLLM server at {self.url} runs vLLM {server} and this trainer {local_version}; the weight "
                "push needs the same release on both sides. Install one version in both environments."
            )
        self.model = self._call("GET", "/v1/models")["data"][0]["id"]
        info = self._call("GET", "/server_info?config_format=json", missing_ok=True)
        wants = _missing_flag(info["vllm_config"] if info is not None else None)
        if wants:
            raise UserError(
                f"The vLLM server at {self.url} cannot take part in training: restart it with {wants}: {SERVE}"
            )

    def open(self, device: torch.device) -> None:
        """The NCCL group: the trainer is rank 0, the server's workers 1..W (TRL's init_communicator)."""
        world = self._call("GET", "/get_world_size")["world_size"] + 1
        info = {
            "master_address": self.transport.address(),
            "master_port": self.group_port,
            "rank_offset": 1,
            "world_size": world,
            **self.transport.init_fields,
        }
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # vLLM builds the trainer's end on the current device
        with ThreadPoolExecutor(1) as pool:  # the server blocks in the rendezvous while it answers
            answer = pool.submit(self._call, "POST", "/init_weight_transfer_engine", {"init_info": info})
            self.transport.open(info)
            answer.result()
        self.opened = True

    def push(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """Announce the tensors, stream them while the server receives, finish, and drop cached prefixes."""
        info = {
            "names": [n for n, _ in pairs],
            "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in pairs],
            "shapes": [list(t.shape) for _, t in pairs],
            **self.transport.update_fields,
        }
        self._call("POST", "/start_weight_update", {})
        with ThreadPoolExecutor(1) as pool:  # the workers block in the NCCL receive while they answer
            answer = pool.submit(self._call, "POST", "/update_weights", {"update_info": info})
            self.transport.send(iter(pairs))
            answer.result()
        self._call("POST", "/finish_weight_update", {})
        self._call("POST", "/reset_prefix_cache")  # cached prefixes were computed with the old weights

    def complete(self, request: dict) -> dict:
        """One /v1/completions request of one prompt: its only choice."""
        return self._call("POST", "/v1/completions", {"model": self.model, **request})["choices"][0]

    def close(self) -> None:
        if self.opened:
            self.transport.close()
            self.opened = False


def wait_for(url: str, timeout: float) -> None:
    """Until GET /health answers 200, for up to `timeout` seconds (TRL's check_server); else a UserError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _NO_PROXY.open(url + "/health", timeout=10) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise UserError(
                f"rollout.mode=server: no vLLM server answers at {url} (waited {timeout:g} s). Start one on GPUs of "
                f"its own, e.g. CUDA_VISIBLE_DEVICES=1 {SERVE} --port PORT (MODEL: the run's model.name), then set "
                "rollout.host and rollout.port to it (rollout.server_timeout waits longer for one still starting)."
            )
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))


def _release(version: str) -> str:
    from packaging.version import Version

    return Version(version).base_version  # "0.31.0+cu129" is 0.31.0


def _missing_flag(config: dict | None) -> str | None:
    """What the server was started without, from its /server_info config (None: the route is missing, which
    only VLLM_SERVER_DEV_MODE=1 adds)."""
    if config is None:
        return "VLLM_SERVER_DEV_MODE=1 in its environment (the weight-update endpoints are dev endpoints)"
    if config.get("weight_transfer_config") is None:
        return """--weight-transfer-config '{"backend": "nccl"}'"""
    if config["model_config"].get("logprobs_mode") != "processed_logprobs":
        return "--logprobs-mode processed_logprobs (the importance weights compare temperature-scaled log-probs)"
    return None


def connect(vllm, host: str, port: int, group_port: int, timeout: float) -> Client:
    url = f"http://{host}:{port}"
    wait_for(url, timeout)
    client = Client(url, make_transport(vllm), group_port)
    client.check(vllm.__version__)
    return client


class ServerBackend(RolloutBackend):
    """RolloutBackend over a Client: weights pushed at construction and at every sync, rows sampled by HTTP."""

    external = True

    def __init__(self, model, tokenizer, client: Client, *, chunk_size: int = 256, score_batch_size: int = 8):
        self.tokenizer, self.client, self.note, self.pushes = tokenizer, client, FilterNote(), 0
        self.chunk_size, self.score_batch_size = chunk_size, score_batch_size  # chunk_size: requests in flight
        if collectives.is_main():
            client.open(next(model.parameters()).device)
            atexit.register(client.close)
        self.sync(model)  # the trainer's weights, not what the server loaded, before the first sample

    def sync(self, model) -> None:
        """Push now: the server holds one copy for every rank, so rank 0 sends it (every rank gathers a sharded
        model's weights) and the others wait until it is in before they sample."""
        self.model = model
        with sharding.full_weights(model):
            if collectives.is_main():
                with merged_weights(model) as pairs:
                    self.client.push(pairs)
                self.pushes += 1
        collectives.barrier()

    def generate(
        self,
        prompt_ids,
        prompt_mask,
        sampling: Sampling,
        budgets: list[int] | None = None,
        seeds: list[int] | None = None,
    ) -> Generations:
        """One request per row, each with its own seed (a request's seed applies to each of its prompts, so
        a group's repeated prompt in one request would draw one completion G times)."""
        self.note(sampling)
        n = prompt_ids.shape[0]
        stops = stop_ids(self.model, self.tokenizer)
        common = {
            "n": 1,
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "logprobs": 0,  # the sampled token's log-prob only
            "stop_token_ids": stops,
            "return_token_ids": True,  # token ids in the answer, as TRL's client asks
            "return_tokens_as_token_ids": True,
        }
        budgets = budgets or [sampling.max_new_tokens] * n
        rows = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask)]
        requests = [
            {**common, "prompt": [r], "max_tokens": b, "seed": s}
            for r, b, s in zip(rows, budgets, request_seeds(seeds, n))
        ]
        with ThreadPoolExecutor(max(1, min(self.chunk_size, 64, n))) as pool:
            choices = list(pool.map(self.client.complete, requests))
        return generations([_row(c) for c in choices], stops, self.tokenizer.pad_token_id, prompt_ids.device)


def _row(choice: dict) -> tuple[list[int], list[float]]:
    toks, lps = choice["token_ids"], choice["logprobs"]["token_logprobs"]
    if any(lp is None for lp in lps):  # NaN goes out as null
        raise RuntimeError("the vLLM server returned a completion whose log-probs are NaN: its weights are broken")
    return toks, lps
