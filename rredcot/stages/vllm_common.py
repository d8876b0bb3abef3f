"""What both vLLM modes share (stages/vllm_backend.py: the engine in the trainer's process; stages/vllm_server.py:
a `vllm serve` server on its own GPUs): the supported range, the trainer's weights as vLLM names them, the
per-request seeds, and a batch of vLLM completions as the [N, T] tensors a RolloutBackend returns."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from rredcot.stages.rollout import Generations, Sampling
from rredcot.ui import note

# TRL 1.16.0's range: its `vllm` extra is vllm>=0.22.0,<=0.31.0 and trl/import_utils.py is_vllm_available warns
# outside it. Every vLLM call in these modules was read against the 0.22.0 and 0.31.0 sources (and 0.33.0, the newest
# on PyPI, which reads the same but is outside what TRL supports, so not admitted); the server protocol's two changes
# inside the range (0.26.0: /reset_prefix_cache answers a body; 0.28.0: the NCCL trainer side) are TRL's, as its
# vllm_client.py states them. Also the `vllm` extra in pyproject.toml.
SUPPORTED = (">=0.22.0", "<=0.31.0")


@contextmanager
def merged_weights(model):
    """(name, tensor) pairs named as in a plain transformers checkpoint of `model`; a peft model's
    adapter is merged for the duration (vLLM has no LoRA layers here) and unmerged after (TRL 1.16's
    VLLMGeneration._iter_named_params renames the same way)."""
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


def request_seeds(seeds: list[int] | None, n: int) -> list[int]:
    """One seed per request: the keyed ones (sampling.row_seeds), else drawn from torch's generator. vLLM
    takes a seed per request (SamplingParams.seed, CompletionRequest.seed), so a row's completion does not
    depend on the other rows of its batch, as far as the engine's kernels allow (see RolloutBackend)."""
    return [s % (2**31 - 1) for s in seeds] if seeds else torch.randint(0, 2**31 - 1, (n,)).tolist()


class FilterNote:
    """Says once that the engine's log-probs are taken after top-p/top-k, the trainer's before."""

    def __init__(self):
        self.said = False

    def __call__(self, sampling: Sampling) -> None:
        if not sampling.greedy and (sampling.top_p < 1 or sampling.top_k) and not self.said:
            note(
                "rollout=vllm with rollout.top_p < 1 or top_k > 0: the engine's log-probs are taken after that filter, "
                "the trainer's before it, so the importance weights (update.is_cap) also carry that difference."
            )
            self.said = True


def generations(rows: list[tuple[list[int], list[float]]], stops: list[int], pad_id: int, device) -> Generations:
    """(token ids, their log-probs) per completion -> [N, T] tensors padded like the reference backend's.

    truncated: the completion does not end in a stop id, the reference backend's definition (and TRL's, which
    masks completions without an EOS). vLLM agrees: its check_stop (v1/core/sched/utils.py, 0.22.0-0.31.0) tests
    the stop ids before max_tokens, so an EOS drawn as the last allowed token finishes "stop", not "length"."""
    T = max([len(ids) for ids, _ in rows] + [1])
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    logp = torch.zeros(len(rows), T)
    for i, (toks, lps) in enumerate(rows):
        ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        mask[i, : len(toks)] = 1
        logp[i, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
    truncated = torch.tensor([not toks or toks[-1] not in stops for toks, _ in rows])
    return Generations(ids.to(device), mask.to(device), logp.to(device), None, truncated.to(device))
