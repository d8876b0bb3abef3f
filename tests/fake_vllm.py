"""A stand-in for vLLM's offline engine, with the interface rollout=vllm uses (vllm.LLM, SamplingParams,
sleep/wake_up, reset_prefix_cache, the driver worker's model.load_weights, RequestOutput shapes).

It samples with rredcot's own KV-cache loop on its own copy of the weights, loaded from the path it is
given and held in `LLM.dtype_override` if set (bf16 makes a real sampler/trainer mismatch), one request at a
time under the request's seed. Everything around the engine is therefore tested for real on CPU: weight
pushes (a missing or misnamed tensor fails as in vLLM), sleep/wake order, seeds, log-probs, and the
importance correction. What it cannot test is vLLM itself: that is the `gpu` test's job.
"""

from __future__ import annotations

import types

import torch
from transformers import AutoModelForCausalLM

from rredcot.stages.rollout import generate


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
        self.kwargs = kwargs


class Logprob:
    def __init__(self, logprob: float):
        self.logprob = logprob


class LLM:
    instances: list["LLM"] = []
    dtype_override: torch.dtype | None = None

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.asleep = kwargs, [], False
        dtype = LLM.dtype_override or getattr(torch, kwargs["dtype"])
        self.net = AutoModelForCausalLM.from_pretrained(kwargs["model"], dtype=dtype).eval()
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
        )
        LLM.instances.append(self)

    def _load_weights(self, pairs) -> None:
        state = self.net.state_dict()
        with torch.no_grad():
            for name, tensor in pairs:
                state[name].copy_(tensor)  # KeyError on a name the engine's model does not have
        self.calls.append("load_weights")

    def sleep(self, level: int) -> None:
        assert not self.asleep, "sleep() on a sleeping engine"
        self.asleep = True
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None) -> None:
        self.asleep = False
        self.calls.append("wake_up")

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")

    def generate(self, prompts, sampling_params, use_tqdm=False):
        assert not self.asleep, "generate() on a sleeping engine"
        assert len(prompts) == len(sampling_params)
        self.calls.append("generate")
        out = []
        for prompt, sp in zip(prompts, sampling_params):
            ids = torch.tensor([prompt["prompt_token_ids"]])
            with torch.random.fork_rng():
                torch.manual_seed(sp.seed)
                toks, mask, lp, _, trunc = generate(
                    self.net,
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
            completion = types.SimpleNamespace(
                token_ids=token_ids,
                logprobs=[{t: Logprob(float(v))} for t, v in zip(token_ids, lp[0, :n])],
                finish_reason="length" if bool(trunc[0]) else "stop",
            )
            out.append(types.SimpleNamespace(outputs=[completion]))
        return out


module = types.SimpleNamespace(__version__="0.10.2", LLM=LLM, SamplingParams=SamplingParams)
