"""A stand-in for vLLM's offline engine with the object layout and the behaviour rollout=vllm depends on, as
vLLM 0.22.0-0.31.0 have them (the file each one comes from is named where it is reproduced):

- V1 runs its engine core in a child process unless the engine is built with
  distributed_executor_backend="external_launcher" (or VLLM_ENABLE_V1_MULTIPROCESSING=0): only an in-process
  LLMEngine has `model_executor` (v1/engine/llm_engine.py), and there `LLM.collective_rpc(fn, args=...)` calls
  fn(worker, *args) on the driver worker with the arguments by reference (v1/executor/uniproc_executor.py); in a
  child process a callable must be serialized, which msgpack refuses (v1/serial_utils.py);
- external_launcher reads RANK, LOCAL_RANK (ExecutorWithExternalLauncher) and MASTER_ADDR, MASTER_PORT
  (init_process_group "env://") while the engine is built;
- building an engine reseeds python's, numpy's and torch's global RNGs with its seed, 0 by default
  (utils/torch_utils.py set_random_seed, from Worker.init_device);
- a request finishes "stop" when its last token is a stop id, tested before "length" (v1/core/sched/utils.py).

It samples with rredcot's own KV-cache loop on its own copy of the weights, loaded from the path it is given and
held in `LLM.dtype_override` if set (bf16 makes a real sampler/trainer mismatch), one request at a time under
the request's seed. Everything around the engine is therefore tested for real on CPU: weight pushes (a missing
or misnamed tensor fails as in vLLM), sleep/wake order, seeds, log-probs, and the importance correction. What it
cannot test is vLLM itself: that is the `gpu` test's job. The server mode's stand-in: tests/fake_vllm_server.py.
"""

from __future__ import annotations

import os
import random
import types

import numpy
import torch
from transformers import AutoModelForCausalLM

from rredcot.stages.rollout import generate

VERSION = "0.31.0"


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
        self.kwargs = kwargs


class Logprob:
    def __init__(self, logprob: float):
        self.logprob = logprob


def set_random_seed(seed: int) -> None:
    """vllm.utils.torch_utils.set_random_seed."""
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def sample(net, prompt: list[int], sp) -> tuple[list[int], list[float], str]:
    """One request: (token ids, their log-probs, finish_reason), drawn under the request's own seed."""
    ids = torch.tensor([prompt])
    with torch.random.fork_rng():
        torch.manual_seed(sp.seed)
        toks, mask, lp, _, _ = generate(
            net,
            ids,
            torch.ones_like(ids),
            eos_id=sp.stop_token_ids,
            pad_id=0,
            max_new_tokens=sp.max_tokens,
            temperature=sp.temperature or 1.0,
            top_p=sp.top_p,
            top_k=max(sp.top_k, 0),
            greedy=sp.temperature == 0,
        )
    n = int(mask.sum())
    token_ids = toks[0, :n].tolist()
    return token_ids, lp[0, :n].tolist(), finish_reason(token_ids, sp.stop_token_ids, sp.max_tokens)


def finish_reason(token_ids: list[int], stops: list[int], max_tokens: int) -> str | None:
    """check_stop's order: a stop id first, then the length cap."""
    if token_ids and token_ids[-1] in stops:
        return "stop"
    return "length" if len(token_ids) >= max_tokens else None


class LLM:
    instances: list["LLM"] = []
    dtype_override: torch.dtype | None = None

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.asleep = kwargs, [], False
        external = kwargs.get("distributed_executor_backend") == "external_launcher"
        self.in_process = external or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        if external:  # KeyError where no launcher (and not rollout=vllm) set them, as in vLLM
            self.launch_env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        dtype = LLM.dtype_override or getattr(torch, kwargs["dtype"])
        self.net = AutoModelForCausalLM.from_pretrained(kwargs["model"], dtype=dtype).eval()
        set_random_seed(kwargs.get("seed", 0))
        model = types.SimpleNamespace(load_weights=self._load_weights)
        self.worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model))
        self.llm_engine = types.SimpleNamespace(collective_rpc=self.collective_rpc)
        if self.in_process:
            self.llm_engine.model_executor = types.SimpleNamespace(driver_worker=self.worker)
        LLM.instances.append(self)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if callable(method) and not self.in_process:
            raise TypeError(
                f"Object of type {type(method)} is not serializableSet VLLM_ALLOW_INSECURE_SERIALIZATION=1 to allow "
                "fallback to pickle-based serialization."
            )
        fn = getattr(self.worker, method) if isinstance(method, str) else (lambda *a, **k: method(self.worker, *a, **k))
        return [fn(*args, **(kwargs or {}))]

    def _load_weights(self, weights):
        state = self.net.state_dict()
        with torch.no_grad():
            for name, tensor in weights:
                state[name].copy_(tensor)  # KeyError on a name the engine's model does not have
        self.calls.append("load_weights")
        return {name for name, _ in weights}

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        assert not self.asleep, "sleep() on a sleeping engine"
        self.asleep = True
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None) -> None:
        self.asleep = False
        self.calls.append("wake_up")

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append("reset_prefix_cache")
        return True

    def generate(self, prompts, sampling_params, use_tqdm=False):
        assert not self.asleep, "generate() on a sleeping engine"
        assert len(prompts) == len(sampling_params)
        self.calls.append("generate")
        out = []
        for prompt, sp in zip(prompts, sampling_params):
            token_ids, lps, reason = sample(self.net, prompt["prompt_token_ids"], sp)
            completion = types.SimpleNamespace(
                token_ids=token_ids, logprobs=[{t: Logprob(v)} for t, v in zip(token_ids, lps)], finish_reason=reason
            )
            out.append(types.SimpleNamespace(outputs=[completion]))
        return out


module = types.SimpleNamespace(__version__=VERSION, LLM=LLM, SamplingParams=SamplingParams)
