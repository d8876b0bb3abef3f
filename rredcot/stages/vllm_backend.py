"""rollout=vllm: vLLM as the rollout backend (pip install 'rredcot[vllm]', CUDA only), in one of two modes.

rollout.mode=colocate (default): a vLLM engine in the trainer's process, on its GPU, with its own copy of
the weights:
- it loads the model the run started from, then takes the trainer's weights before its first sample
  (a LoRA adapter is merged for the copy; a resumed run's weights are not what it loaded);
- after every optimizer step the copy is marked stale and refreshed before the next sample (`sync`);
- with `sleep=true` it sleeps (vLLM sleep mode, level 1: weights to CPU, KV cache freed) while the
  trainer runs its gradient passes, and wakes for sampling, Monte Carlo values and evaluation;
- it returns token ids and its own log-probs ("processed": after temperature, as the trainer's are).
rollout.mode=server: a `vllm serve` server on GPUs of its own (stages/vllm_server.py).
Either way the trainer re-scores the tokens (rollout.sample_rollout) and the update multiplies each token's
surrogate by min(p_trainer / p_engine, update.is_cap) (update.sampler_correction).

The weight push follows TRL 1.16's colocate mode (trl/generation/vllm_generation.py, VLLMGeneration._init_vllm
and sync_weights): the engine is built with distributed_executor_backend="external_launcher" even on one GPU.
That keeps vLLM's engine core in this process: ParallelConfig sets VLLM_ENABLE_V1_MULTIPROCESSING=0 for it
(vllm/config/parallel.py), and only an in-process core gives LLMEngine a `model_executor`
(vllm/v1/engine/llm_engine.py); by default (VLLM_ENABLE_V1_MULTIPROCESSING=1) V1 runs the core in a child
process, where the trainer's tensors cannot reach the worker by reference. TRL then calls
llm_engine.model_executor.driver_worker.model_runner.model.load_weights; here the same call goes through the
public LLM.collective_rpc, which in-process hands a callable the driver worker (run_method in
vllm/v1/serial_utils.py). Read against vLLM 0.22.0 and 0.31.0 (TRL 1.16's range) and 0.33.0. vLLM is imported
only when this backend is chosen; its version must be in SUPPORTED.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy
import torch

from rredcot import collectives
from rredcot.errors import UserError
from rredcot.lora import base_model
from rredcot.ranges import COUNT, FRACTION, NON_NEGATIVE, Rule, integer, one_of, optional
from rredcot.registry import register
from rredcot.stages.rollout import Generations, RolloutBackend, Sampling, stop_ids
from rredcot.stages.vllm_common import SUPPORTED, FilterNote, generations, merged_weights, request_seeds

__all__ = ["SUPPORTED", "VLLMBackend", "engine_source", "merged_weights", "vllm_backend"]


def _import_vllm():
    """The vllm module, or a UserError that says how to install a supported version."""
    from packaging.specifiers import SpecifierSet

    want = ",".join(SUPPORTED)
    try:
        import vllm
    except ImportError:
        raise UserError(
            f"rollout=vllm needs vLLM ({want}), which is not installed here. Install it with "
            "pip install 'rredcot[vllm]' (Linux with a CUDA GPU), or use rollout=sample, the built-in "
            "sampler that needs nothing more."
        ) from None
    if getattr(vllm, "__version__", "0") not in SpecifierSet(want, prereleases=True):
        raise UserError(
            f"rollout=vllm supports vLLM {want} (the range TRL 1.16 supports, whose weight-update calls it uses); "
            f"this environment has {vllm.__version__}. Install a supported one with pip install 'rredcot[vllm]', "
            "or use rollout=sample."
        )
    return vllm


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise UserError(
            "rollout=vllm runs on a CUDA GPU, and torch sees none here. Use rollout=sample (the built-in "
            "sampler runs on CPU and GPU)."
        )


def _check(options, prefix: str) -> None:
    """Config time, before anything is written: vLLM importable in a supported version, a GPU (server mode: for
    the NCCL weight push), and in server mode a server that answers."""
    _import_vllm()
    _require_cuda()
    if options.get("mode") == "server":
        from rredcot.stages.vllm_server import wait_for

        wait_for(
            f"http://{options.get('host', 'localhost')}:{options.get('port', 8000)}", options.get("server_timeout", 0)
        )


def engine_source(model, scratch: Path) -> str:
    """What the engine loads: the folder or hub name the model came from, else a copy saved in `scratch`
    (an in-memory model); the trainer's weights are pushed before the first sample either way."""
    base = base_model(model)
    name = getattr(base, "name_or_path", "") or ""
    if name and (Path(name).is_dir() or not Path(name).is_absolute()):
        return name
    base.save_pretrained(scratch)
    return str(scratch)


@contextmanager
def kept_rng_state():
    """The trainer's global RNGs as they were: building an engine reseeds python's, numpy's and torch's (CPU and
    CUDA) with its own seed (vllm.utils.torch_utils.set_random_seed, from Worker.init_device and
    compile_or_warm_up_model, 0.22.0 and 0.31.0), and in this process they are the trainer's."""
    py, np_state = random.getstate(), numpy.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        numpy.random.set_state(np_state)


@contextmanager
def launcher_env():
    """The torchrun variables external_launcher reads while the engine is built (ExecutorWithExternalLauncher:
    RANK, LOCAL_RANK; init_process_group("env://"): MASTER_ADDR, MASTER_PORT), set where no launcher did (one
    process) and removed after, as TRL's ensure_master_addr_port picks a free port."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    local = os.environ.get("LOCAL_RANK", "0")
    want = {"RANK": str(collectives.rank()), "LOCAL_RANK": local, "WORLD_SIZE": str(collectives.size())}
    want.update(MASTER_ADDR="localhost", MASTER_PORT=port)
    added = [k for k in want if k not in os.environ]
    os.environ.update({k: want[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _load_weights(worker, pairs) -> None:
    """Runs on vLLM's worker (collective_rpc passes it as `self`): the model's own loader, as TRL 1.16 calls it
    (model_runner.model.load_weights; the worker wrapper forwards model_runner to the worker, 0.22.0-0.31.0)."""
    worker.model_runner.model.load_weights(pairs)


class VLLMBackend(RolloutBackend):
    """A vLLM `LLM` (or an object with its interface: tests use a fake engine) behind RolloutBackend."""

    external = True

    def __init__(
        self, model, tokenizer, llm, params_cls, *, chunk_size: int = 256, sleep: bool = True, score_batch_size: int = 8
    ):
        self.model, self.tokenizer, self.llm, self.params_cls = model, tokenizer, llm, params_cls
        self.chunk_size, self.sleep_mode, self.score_batch_size = chunk_size, sleep, score_batch_size
        self.stale, self.asleep, self.pushes, self.note = True, False, 0, FilterNote()  # stale: the trainer's
        # weights (a LoRA adapter, a resumed run) are not what the engine loaded: pushed before the first sample
        if getattr(llm.llm_engine, "model_executor", None) is None:  # in-process engine cores only have one
            raise RuntimeError(
                "vLLM built its engine core in another process (V1 multiprocessing), where the trainer's weights "
                "cannot be pushed by reference, although rollout=vllm asks for distributed_executor_backend="
                "'external_launcher', which keeps it in this process in every supported vLLM."
            )
        self.sleep()

    def sync(self, model) -> None:
        self.model, self.stale = model, True

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)  # level 1 keeps the weights (in CPU memory): waking needs no reload
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the gradient passes' cached blocks, before the engine takes its share
            self.llm.wake_up()
            self.asleep = False
        if self.stale:
            with merged_weights(self.model) as pairs:
                self.llm.collective_rpc(_load_weights, args=(pairs,))
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
            self.stale, self.pushes = False, self.pushes + 1

    def generate(
        self,
        prompt_ids,
        prompt_mask,
        sampling: Sampling,
        budgets: list[int] | None = None,
        seeds: list[int] | None = None,
    ) -> Generations:
        """One request per row (rows are already repeated per group), each with its own seed."""
        self.wake()
        self.note(sampling)
        n = prompt_ids.shape[0]
        budgets = budgets or [sampling.max_new_tokens] * n
        stops = stop_ids(self.model, self.tokenizer)
        params = [
            self.params_cls(
                n=1,
                temperature=0.0 if sampling.greedy else sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,  # 0 disables it (SamplingParams, 0.22.0-0.31.0)
                max_tokens=b,
                logprobs=0,  # the sampled token's log-prob only
                stop_token_ids=stops,
                seed=s,
                detokenize=False,
            )
            for b, s in zip(budgets, request_seeds(seeds, n))
        ]
        prompts = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(prompt_ids, prompt_mask)]
        outs = [o.outputs[0] for o in self.llm.generate(prompts, sampling_params=params, use_tqdm=False)]
        return generations([_row(o) for o in outs], stops, self.tokenizer.pad_token_id, prompt_ids.device)


def _row(out) -> tuple[list[int], list[float]]:
    """A CompletionOutput's token ids and their log-probs (each position's dict holds the sampled token)."""
    toks = list(out.token_ids)
    return toks, [(lp.get(t) or next(iter(lp.values()))).logprob for t, lp in zip(toks, out.logprobs or [])]


HOST = Rule(lambda v: isinstance(v, str) and bool(v.strip()), "a host name or IP address")
PORT = integer(1, 65535)


@register(
    "rollout",
    "vllm",
    rules={
        "mode": one_of("colocate", "server"),
        "chunk_size": COUNT,
        "gpu_memory_utilization": FRACTION,
        "max_model_len": optional(integer(16)),
        "max_num_batched_tokens": integer(16),
        "max_prompt_tokens": COUNT,
        "max_completion_tokens": COUNT,
        "sleep": one_of(True, False),
        "enforce_eager": one_of(True, False),
        "score_batch_size": COUNT,
        "host": HOST,
        "port": PORT,
        "group_port": PORT,
        "server_timeout": NON_NEGATIVE,
    },
    check=_check,
)
def vllm_backend(
    model,
    tokenizer,
    *,
    mode: str = "colocate",
    chunk_size: int = 256,
    gpu_memory_utilization: float = 0.3,
    max_model_len: int | None = None,
    max_num_batched_tokens: int = 4096,
    max_prompt_tokens: int = 512,
    max_completion_tokens: int = 48,
    sleep: bool = True,
    enforce_eager: bool = False,
    score_batch_size: int = 8,
    host: str = "localhost",
    port: int = 8000,
    group_port: int = 51216,
    server_timeout: float = 240.0,
) -> RolloutBackend:
    """rollout=vllm: builds the engine, or connects to the server (see the module docstring)."""
    vllm, batch = _import_vllm(), score_batch_size
    _require_cuda()
    if mode == "server":
        from rredcot.stages import vllm_server

        client = vllm_server.connect(vllm, host, port, group_port, server_timeout)
        return vllm_server.ServerBackend(model, tokenizer, client, chunk_size=chunk_size, score_batch_size=batch)
    scratch = Path(tempfile.mkdtemp(prefix="rredcot_vllm_"))
    with kept_rng_state(), launcher_env():
        llm = vllm.LLM(
            model=engine_source(model, scratch),
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len or model_len(model, max_prompt_tokens, max_completion_tokens),
            # TRL 1.16 passes 4096: V1's memory profiler sizes its dummy batch by it (default 8192-32768) and then
            # finds too little room for the KV cache
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=chunk_size,
            enable_sleep_mode=sleep,
            enforce_eager=enforce_eager,
            skip_tokenizer_init=True,  # token ids in and out
            logprobs_mode="processed_logprobs",  # after temperature, like the trainer's log-probs
            seed=0,  # every request has its own seed; this one only reseeds the process (undone: kept_rng_state)
            distributed_executor_backend="external_launcher",  # the engine core in this process (module docstring)
        )
    return VLLMBackend(
        model, tokenizer, llm, vllm.SamplingParams, chunk_size=chunk_size, sleep=sleep, score_batch_size=batch
    )


def model_len(model, max_prompt_tokens: int, max_completion_tokens: int) -> int:
    """max_model_len=null: the longest sequence a run asks for, within the model's context. vLLM refuses to start
    when its KV cache cannot hold one max_model_len sequence, and the model's own context (32k-128k) fails that
    at a 0.3 share of a 40 GB card. +1: a Monte Carlo continuation of a whole completion still asks for a token,
    and vLLM refuses a prompt as long as max_model_len (InputProcessor._validate_prompt_len, 0.22.0-0.31.0)."""
    longest = max_prompt_tokens + max_completion_tokens + 1
    context = getattr(model.config, "max_position_embeddings", None)  # as startup.model_context reads it
    context = context if isinstance(context, int) and context > 0 else None
    return min(longest, context) if context else longest
