"""rollout=vllm: a colocated vLLM engine as the rollout backend (pip install 'rredcot[vllm]', CUDA only).

The engine lives in the trainer's process and on its GPU, with its own copy of the weights:
- it loads the model the run started from, then takes the trainer's weights before its first sample
  (a LoRA adapter is merged for the copy; a resumed run's weights are not what it loaded);
- after every optimizer step the copy is marked stale and refreshed before the next sample (`sync`);
- with `sleep=true` it sleeps (vLLM sleep mode, level 1: weights to CPU, KV cache freed) while the
  trainer runs its gradient passes, and wakes for sampling, Monte Carlo values and evaluation;
- it returns token ids and its own log-probs ("processed": after temperature, as the trainer's are).
The trainer re-scores the tokens (rollout.sample_rollout) and the update multiplies each token's
surrogate by min(p_trainer / p_engine, update.is_cap) (update.sampler_correction).

vLLM is imported only when this backend is chosen; its version must be in SUPPORTED (the engine API
used here: LLM(enable_sleep_mode, logprobs_mode, skip_tokenizer_init), sleep/wake_up, reset_prefix_cache,
and the driver worker's model.load_weights, as TRL's colocate mode uses them).
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from rredcot import collectives
from rredcot.errors import UserError
from rredcot.lora import base_model
from rredcot.ranges import COUNT, FRACTION, integer, one_of, optional
from rredcot.registry import register
from rredcot.stages.rollout import Generations, RolloutBackend, Sampling, stop_ids
from rredcot.ui import note

SUPPORTED = (">=0.10.2", "<0.12")  # also the `vllm` extra in pyproject.toml


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
            f"rollout=vllm supports vLLM {want}; this environment has {vllm.__version__}. Install a "
            "supported one with pip install 'rredcot[vllm]', or use rollout=sample."
        )
    return vllm


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise UserError(
            "rollout=vllm runs on a CUDA GPU, and torch sees none here. Use rollout=sample (the built-in "
            "sampler runs on CPU and GPU)."
        )


def _check(options, prefix: str) -> None:
    """Config time: vLLM importable in a supported version, and a GPU to run it on."""
    _import_vllm()
    _require_cuda()


@contextmanager
def merged_weights(model):
    """(name, tensor) pairs named as in a plain transformers checkpoint of `model`; a peft model's
    adapter is merged for the duration (the engine has no LoRA layers) and unmerged after."""
    if not hasattr(model, "merge_adapter"):
        yield [(n.replace("_checkpoint_wrapped_module.", ""), p.data) for n, p in model.named_parameters()]
        return
    model.merge_adapter()
    try:
        pairs = []
        for name, p in model.named_parameters():
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if model.prefix in name or "original_module" in name:  # adapter tensors: already merged in
                continue
            pairs.append((name.replace("modules_to_save.default.", ""), p.data))
        yield pairs
    finally:
        model.unmerge_adapter()


def engine_source(model, scratch: Path) -> str:
    """What the engine loads: the folder or hub name the model came from, else a copy saved in `scratch`
    (an in-memory model); the trainer's weights are pushed before the first sample either way."""
    base = base_model(model)
    name = getattr(base, "name_or_path", "") or ""
    if name and (Path(name).is_dir() or not Path(name).is_absolute()):
        return name
    base.save_pretrained(scratch)
    return str(scratch)


class VLLMBackend(RolloutBackend):
    """A vLLM `LLM` (or an object with its interface: tests use a fake engine) behind RolloutBackend."""

    external = True

    def __init__(
        self, model, tokenizer, llm, params_cls, *, chunk_size: int = 256, sleep: bool = True, score_batch_size: int = 8
    ):
        self.model, self.tokenizer, self.llm, self.params_cls = model, tokenizer, llm, params_cls
        self.chunk_size, self.sleep_mode, self.score_batch_size = chunk_size, sleep, score_batch_size
        self.stale, self.asleep, self.pushes, self.noted = True, False, 0, False  # stale: the trainer's weights
        # (a LoRA adapter, a resumed run) are not what the engine loaded, so they are pushed before the first sample
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
                self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(pairs)
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
        """One request per row (rows are already repeated per group), each with its own seed: the keyed one
        (the same completions at any world size) or one drawn from torch's generator."""
        self.wake()
        if not sampling.greedy and (sampling.top_p < 1 or sampling.top_k) and not self.noted:
            note(
                "rollout=vllm with rollout.top_p < 1 or top_k > 0: the engine's log-probs are taken after that filter, "
                "the trainer's before it, so the importance weights (update.is_cap) also carry that difference."
            )
            self.noted = True
        n = prompt_ids.shape[0]
        budgets = budgets or [sampling.max_new_tokens] * n
        seeds = [s % (2**31 - 1) for s in seeds] if seeds else torch.randint(0, 2**31 - 1, (n,)).tolist()
        stops = stop_ids(self.model, self.tokenizer)
        params = [
            self.params_cls(
                n=1,
                temperature=0.0 if sampling.greedy else sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or -1,
                max_tokens=b,
                logprobs=0,
                stop_token_ids=stops,
                seed=s,
                detokenize=False,
            )
            for b, s in zip(budgets, seeds)
        ]
        prompts = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(prompt_ids, prompt_mask)]
        outs = [o.outputs[0] for o in self.llm.generate(prompts, sampling_params=params, use_tqdm=False)]
        return self._tensors(outs, prompt_ids.device)

    def _tensors(self, outs, device) -> Generations:
        """vLLM outputs -> [N, T] tensors padded like the reference backend's."""
        T = max([len(o.token_ids) for o in outs] + [1])
        ids = torch.full((len(outs), T), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        logp = torch.zeros(len(outs), T)
        for i, o in enumerate(outs):
            toks = list(o.token_ids)
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, : len(toks)] = 1
            lps = [(lp.get(t) or next(iter(lp.values()))).logprob for t, lp in zip(toks, o.logprobs or [])]
            logp[i, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
        truncated = torch.tensor([o.finish_reason == "length" for o in outs])
        return Generations(ids.to(device), mask.to(device), logp.to(device), None, truncated.to(device))


@register(
    "rollout",
    "vllm",
    rules={
        "chunk_size": COUNT,
        "gpu_memory_utilization": FRACTION,
        "max_model_len": optional(integer(16)),
        "sleep": one_of(True, False),
        "enforce_eager": one_of(True, False),
        "score_batch_size": COUNT,
    },
    check=_check,
)
def vllm_backend(
    model,
    tokenizer,
    *,
    chunk_size: int = 256,
    gpu_memory_utilization: float = 0.3,
    max_model_len: int | None = None,
    sleep: bool = True,
    enforce_eager: bool = False,
    score_batch_size: int = 8,
) -> VLLMBackend:
    """rollout=vllm: builds the engine (see the module docstring)."""
    vllm = _import_vllm()
    _require_cuda()
    scratch = Path(tempfile.mkdtemp(prefix="rredcot_vllm_"))
    llm = vllm.LLM(
        model=engine_source(model, scratch),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        max_num_seqs=chunk_size,
        enable_sleep_mode=sleep,
        enforce_eager=enforce_eager,
        skip_tokenizer_init=True,  # token ids in and out
        logprobs_mode="processed_logprobs",  # after temperature, like the trainer's log-probs
        seed=int(torch.randint(0, 2**31 - 1, ()).item()),
        # data parallel: one engine per rank on its own GPU, inside the trainer's process group (TRL's colocate mode)
        **({"distributed_executor_backend": "external_launcher"} if collectives.active() else {}),
    )
    return VLLMBackend(
        model,
        tokenizer,
        llm,
        vllm.SamplingParams,
        chunk_size=chunk_size,
        sleep=sleep,
        score_batch_size=score_batch_size,
    )
