"""A stand-in for `VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --weight-transfer-config '{"backend": "nccl"}'
--logprobs-mode processed_logprobs`: the routes rollout.mode=server uses, with the JSON shapes of vLLM 0.31.0
(entrypoints/serve/dev/rlhf/api_router.py, dev/server_info, dev/cache, openai/completion/protocol.py), served by
the stdlib's http.server from a thread, sampling with tests/fake_vllm.py's loop on its own copy of the weights.

The NCCL group is a queue (`Transport`): the trainer's broadcast lands there and /update_weights takes the tensors
it announced, in order, checking names, dtypes and shapes, so a client that announces one thing and sends
another, or does not stream while the server receives, fails here as with NCCL (after `wait_s`, not a hang).
"""

from __future__ import annotations

import json
import queue
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import torch

from tests.fake_vllm import VERSION, sample

INIT_FIELDS = {  # NCCLWeightTransferInitInfo, vLLM >= 0.28.0 (distributed/weight_transfer/nccl_common.py)
    "master_address",
    "master_port",
    "rank_offset",
    "world_size",
    "nccl_unique_id_b64",
    "packed",
    "packed_buffer_size_bytes",
    "packed_num_buffers",
}
UPDATE_FIELDS = {"names", "dtype_names", "shapes"}  # NCCLWeightTransferUpdateInfo, vLLM >= 0.28.0


class Server:
    def __init__(
        self,
        net,
        *,
        port=0,
        wait_s=10.0,
        version=VERSION,
        dev_mode=True,
        weight_transfer=True,
        logprobs="processed_logprobs",
    ):
        self.net, self.version, self.dev_mode, self.wait_s = net.eval(), version, dev_mode, wait_s
        self.config = {
            "model_config": {"logprobs_mode": logprobs},
            "weight_transfer_config": {"backend": "nccl"} if weight_transfer else None,
        }
        self.calls, self.served, self.pushes, self.updating = [], [], 0, False
        self.inbox, self.lock = queue.Queue(), threading.Lock()  # the group; one engine samples at a time
        self.worker_joined, self.trainer_joined = threading.Event(), threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- routes: (status, JSON body or None) ------------------------------------------------------------------

    def get(self, path: str, query: str):
        if path == "/health":
            return 200, None
        if path == "/version":
            return 200, {"version": self.version}
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}
        if path == "/server_info" and self.dev_mode:
            assert query == "config_format=json", query
            return 200, {"vllm_config": self.config, "vllm_env": {}, "system_env": {}}
        if path == "/get_world_size" and self.dev_mode:
            return 200, {"world_size": 1}
        return 404, {"detail": "Not Found"}

    def post(self, path: str, body):
        routes = {
            "/init_weight_transfer_engine": self.init_engine,
            "/start_weight_update": self.start,
            "/update_weights": self.update,
            "/finish_weight_update": self.finish,
            "/reset_prefix_cache": lambda body: {"success": True},
            "/v1/completions": self.complete,
        }
        if path not in routes or (path != "/v1/completions" and not self.dev_mode):
            return 404, {"detail": "Not Found"}
        self.calls.append(path.strip("/"))
        try:
            return 200, routes[path](body)
        except (AssertionError, KeyError, ValueError, RuntimeError, queue.Empty) as e:  # vLLM answers 500
            return 500, {"error": f"{type(e).__name__}: {e}"}

    def init_engine(self, body):
        info = body["init_info"]
        if set(info) - INIT_FIELDS:  # parse_init_info: the dataclass refuses an unknown field
            raise ValueError(f"Invalid init_info: unexpected {sorted(set(info) - INIT_FIELDS)}")
        assert info["rank_offset"] == 1 and info["world_size"] == 2 and info["packed"] is True, info
        self.worker_joined.set()
        if not self.trainer_joined.wait(self.wait_s):  # StatelessProcessGroup.create waits for every rank
            raise RuntimeError("the trainer never joined the group")
        return {"message": "Weight transfer initialized"}

    def start(self, body):
        if self.updating:
            raise RuntimeError("start_weight_update called while a weight update is already active.")
        self.updating = True
        return {"message": "Weight update started"}

    def update(self, body):
        info = body["update_info"]
        if not self.updating:
            raise RuntimeError("start_weight_update must be called before update_weights.")
        if set(info) - UPDATE_FIELDS:
            raise ValueError(f"Invalid update_info: unexpected {sorted(set(info) - UPDATE_FIELDS)}")
        state = self.net.state_dict()
        with self.lock, torch.no_grad():
            for name, dtype, shape in zip(info["names"], info["dtype_names"], info["shapes"]):
                tensor = self.inbox.get(timeout=self.wait_s)  # what the trainer broadcast, in the announced order
                assert str(tensor.dtype).removeprefix("torch.") == dtype and list(tensor.shape) == shape, name
                state[name].copy_(tensor)  # KeyError on a name the served model does not have
        return {"message": "Weights updated"}

    def finish(self, body):
        assert self.updating and self.inbox.empty(), "finish_weight_update with tensors still in flight"
        self.updating, self.pushes = False, self.pushes + 1
        return {"message": "Weight update finished"}

    def complete(self, body):
        assert body["model"] == "fake-model" and body["return_token_ids"] and body["n"] == 1, body
        sp = types.SimpleNamespace(**{k: body.get(k, d) for k, d in [("top_p", 1.0), ("top_k", 0), ("seed", 0)]})
        sp.temperature, sp.max_tokens = body["temperature"], body["max_tokens"]
        sp.stop_token_ids = body["stop_token_ids"]
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            with self.lock:
                ids, lps, reason = sample(self.net, prompt, sp)
            self.served.append(self.pushes)  # which weights sampled it
            tokens = [f"token_id:{t}" for t in ids]
            logprobs = {"text_offset": [], "token_logprobs": lps, "tokens": tokens, "top_logprobs": [{}] * len(ids)}
            choices.append(
                {"index": i, "text": "", "logprobs": logprobs, "finish_reason": reason, "stop_reason": None}
                | {"token_ids": ids, "prompt_token_ids": prompt}
            )
        return {"id": "cmpl-fake", "object": "text_completion", "model": "fake-model", "choices": choices}


def _handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            self._answer(*server.get(url.path, url.query))

        def do_POST(self):
            size = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(size) if size else b""
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                return self._answer(400, {"detail": "Invalid JSON format"})
            self._answer(*server.post(urlparse(self.path).path, body))

        def _answer(self, status: int, payload) -> None:
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # quiet
            pass

    return Handler


class Transport:
    """The NCCL group's stand-in (rredcot.stages.vllm_server.Transport) with vLLM >= 0.28.0's wire format."""

    init_fields, update_fields = {"packed": True}, {}

    def __init__(self, server: Server):
        self.server, self.opened, self.closed, self.sent = server, 0, 0, 0

    def address(self) -> str:
        return "127.0.0.1"

    def open(self, init_info: dict) -> None:
        self.server.trainer_joined.set()
        if not self.server.worker_joined.wait(self.server.wait_s):
            raise RuntimeError("no worker joined the group: /init_weight_transfer_engine was not posted alongside")
        self.opened += 1

    def send(self, pairs) -> None:
        for _, tensor in pairs:  # NCCL carries the tensors only; their names went in /update_weights
            self.server.inbox.put(tensor.detach().clone())
            self.sent += 1

    def close(self) -> None:
        self.closed += 1
