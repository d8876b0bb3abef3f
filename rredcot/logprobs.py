"""Per-token log-probs of completions under a model: the one forward the update, the old policy and
the reference model all use (logits divided by the sampling temperature, as TRL does).

Chunked (the default): the [n, T, V] logits never exist. The model's own forward (through whatever wraps it:
DDP, accelerate, peft, FSDP2, DeepSpeed) runs with its output layer swapped for a pass-through, so `.logits`
is the final hidden state [n, T+1, H]; the real output layer then projects LOGIT_CHUNK tokens at a time,
each chunk under activation checkpointing when gradients are on (the backward recomputes the chunk's logits
instead of keeping them). Memory for the logits: O(LOGIT_CHUNK x V) instead of O(n T V); 9.7 GB of fp32
logits per 16k-token row with Qwen2's vocabulary of 151,936 (benchmarks/memory.py measures it).

logit_chunk=0 takes the full path (one [n, T, V] projection), as does any model whose forward changes the
output layer's result in a way not reproduced here (_TRANSFORMS, _LOGIT_KNOBS; checked after every forward).
Read against transformers 5.24.0 (modeling_qwen2, llama, gemma2, gemma3, cohere, cohere2, granite).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from rredcot.lora import AdapterOff, base_model

# Tokens (rows x positions) per projected chunk. 512 x 151,936 x 4 B = 311 MB per fp32 copy of a chunk's
# logits (~4 copies live in its backward: logits, / temperature, softmax, gradient), while a GEMM of 512 rows
# still runs at full speed on a GPU; the chunk count (T n / 512) adds only Python and launch overhead.
LOGIT_CHUNK = 512

Transform = Callable[[torch.Tensor], torch.Tensor]


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without materialising the full [.., V] log-prob tensor.

    logits [N, T, V], index [N, T] -> [N, T]. Example: logits [[0, log 3]] and index [1] give
    log(3 / (1 + 3)) = -0.2877.
    """
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # [N, T]
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p log p over the last axis: [..., V] -> [...]."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: mask [N, L] -> [N, L], 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    logit_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of every completion token: prompt [n, P] + completion [n, T] -> ([n, T], [n, T] or None).

    Gradients flow when called outside no_grad (the update); the old/reference passes wrap it.
    logit_chunk: tokens per vocabulary projection (see the module doc); 0 = the full [n, T, V] logits;
    None = LOGIT_CHUNK, read at call time (what the update and the re-scoring pass use).
    """
    ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [n, P+T]
    mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [n, P+T]
    logit_chunk = LOGIT_CHUNK if logit_chunk is None else logit_chunk
    if logit_chunk > 0:
        out = _chunked_logprobs(model, ids, mask, completion_ids, temperature, with_entropy, logit_chunk)
        if out is not None:
            return out
    return _full_logprobs(model, ids, mask, completion_ids, temperature, with_entropy)


def no_grad_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float,
    batch: int,
    with_entropy: bool = False,
    logit_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """completion_logprobs without gradients, `batch` rows per forward: ([n, T], [n, T] or None).
    The update's old and reference log-probs and the re-scoring of an external sampler's tokens use it."""
    lps, ents = [], []
    with torch.no_grad():
        for lo in range(0, completion_ids.shape[0], batch):
            sl = slice(lo, lo + batch)
            lp, ent = completion_logprobs(
                model,
                prompt_ids[sl],
                prompt_mask[sl],
                completion_ids[sl],
                completion_mask[sl],
                temperature,
                with_entropy,
                logit_chunk,
            )
            lps.append(lp)
            ents.append(ent)
    return torch.cat(lps), (torch.cat(ents) if with_entropy else None)


def _forward(model, ids: torch.Tensor, mask: torch.Tensor, T: int):
    # logits_to_keep=T+1: only the positions that predict completion tokens reach the output layer; no KV
    # cache to build (and none is possible under gradient checkpointing)
    return model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=T + 1, use_cache=False
    ).logits


def _full_logprobs(model, ids, mask, completion_ids, temperature, with_entropy):
    """The full path: logits [n, T, V] in float32 at once, kept for the backward."""
    logits = _forward(model, ids, mask, completion_ids.shape[1])
    logits = logits[:, :-1].float() / temperature  # [n, T, V]; position t predicts completion token t
    logp = selective_log_softmax(logits, completion_ids)
    ent = entropy_from_logits(logits.detach()) if with_entropy else None
    return logp, ent


def _chunked_logprobs(model, ids, mask, completion_ids, temperature, with_entropy, chunk):
    """The chunked path: ([n, T], [n, T] or None), or None where this model needs the full path."""
    # The KL reference of a LoRA run: the projections below must also run with the adapter off (an adapter
    # on lm_head), so the context is entered here once and the forward goes to the peft model inside it.
    net, ctx = (model.model, model.model.disable_adapter()) if isinstance(model, AdapterOff) else (model, nullcontext())
    head = output_head(net)
    if head is None:
        return None
    n, T = completion_ids.shape
    with ctx:
        hidden, autocast = hidden_states(net, head, lambda m: _forward(m, ids, mask, T))  # [n, T+1, H]
        if hidden is None:
            return None
        h = hidden[:, :-1].reshape(n * T, hidden.shape[-1])  # [n T, H]; position t predicts token t
        y = completion_ids.reshape(n * T)  # [n T]
        project = partial(_project, head.module, head.transform, temperature, with_entropy)
        lps, ents = [], []
        # The chunks run under the autocast state the output layer saw inside the forward (accelerate's
        # mixed precision wraps only the forward), and a checkpointed chunk's recomputation restores it.
        with torch.autocast(h.device.type, dtype=autocast[1], enabled=autocast[0]):
            for lo in range(0, n * T, chunk):
                args = (h[lo : lo + chunk], y[lo : lo + chunk])  # [c, H], [c]
                grad = torch.is_grad_enabled()
                lp, ent = checkpoint(project, *args, use_reentrant=False) if grad else project(*args)
                lps.append(lp)
                ents.append(ent)
    ent = torch.cat(ents).view(n, T) if with_entropy else None
    return torch.cat(lps).view(n, T), ent


def _project(head, transform: Transform | None, temperature: float, with_entropy: bool, h, y):
    """One chunk, the full path's arithmetic: h [c, H], y [c] -> (log-probs [c], entropies [c] or None)."""
    logits = head(h)  # [c, V]: the module itself, so FSDP2 / ZeRO-3 hooks on it gather its weight
    if transform is not None:
        logits = transform(logits)
    logits = logits.float()
    if temperature != 1.0:  # x / 1.0 == x exactly: one [c, V] pass (and its copy) saved
        logits = logits / temperature
    # log_softmax then gather, as the sampling loop (rollout.py) takes its log-probs: its fused backward is
    # ~2x faster than logsumexp's (measured on CPU, 512 x 151,936); the full path's gather - logsumexp agrees
    # to ~1e-7 relative. The entropy is entropy_from_logits's arithmetic on the same log-softmax.
    logp = torch.log_softmax(logits, dim=-1)  # [c, V]
    lp = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.detach().exp() * logp.detach()).sum(-1) if with_entropy else None
    return lp, ent


@dataclass
class _Head:
    """The output layer and where it sits (parent.name), with what the model's forward applies after it."""

    parent: torch.nn.Module
    name: str
    module: torch.nn.Module
    transform: Transform | None


class _PassThrough(torch.nn.Module):
    """Stands in for the output layer during the forward: returns the final hidden states as `.logits`,
    keeping them, their version (an in-place change after it is a post-processing too) and the autocast
    state the real layer would have run under."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        self.seen = (x, x._version, (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
        return x


# Models that need the full path, found after a forward (see hidden_states): not tried again.
_FULL_ONLY: set[type] = set()


def _softcap(cap: float | None) -> Transform | None:
    if cap is None:
        return None
    return lambda x: torch.tanh(x / cap) * cap  # Gemma2/3: logits / cap; tanh; * cap, in this order


# What transformers 5.24.0's forward of these classes does to lm_head's output (read in their modeling_*.py);
# the check in hidden_states catches a version that changed it. Gemma3ForConditionalGeneration: nothing.
_TRANSFORMS: dict[str, Callable[[PreTrainedModel], Transform | None]] = {
    "Gemma2ForCausalLM": lambda m: _softcap(m.config.final_logit_softcapping),
    "Gemma3ForCausalLM": lambda m: _softcap(m.config.final_logit_softcapping),
    "Gemma3ForConditionalGeneration": lambda m: None,
    "CohereForCausalLM": lambda m: lambda x: x * m.logit_scale,
    "Cohere2ForCausalLM": lambda m: lambda x: x * m.logit_scale,
    "GraniteForCausalLM": lambda m: lambda x: x / m.config.logits_scaling,
}
# Settings by which other architectures scale, cap or cut their logits (transformers 5.24.0: beam, gemma3n,
# gemma4, cohere2_moe, granitemoe*, recurrent_gemma, vaultgemma, ...): a model with any of them takes the full path.
_LOGIT_KNOBS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "logits_soft_cap",
    "output_multiplier",
    "unpadded_vocab_size",
)


def _unwrap(net) -> torch.nn.Module:
    """The transformers model under DDP / DeepSpeed (.module), torch.compile (._orig_mod) and peft."""
    m = net
    for _ in range(8):
        if hasattr(m, "get_base_model"):
            m = base_model(m)
        elif not isinstance(m, PreTrainedModel) and isinstance(getattr(m, "module", None), torch.nn.Module):
            m = m.module
        elif isinstance(getattr(m, "_orig_mod", None), torch.nn.Module):
            m = m._orig_mod
        else:
            break
    return m


def _transform(base) -> tuple[bool, Transform | None]:
    """(whether the chunked path can reproduce this model's logits, the function it applies after lm_head)."""
    for cls in type(base).__mro__:  # the MRO: FSDP2 makes an FSDP<Name> subclass
        if cls.__name__ in _TRANSFORMS:
            return True, _TRANSFORMS[cls.__name__](base)
    config = getattr(base, "config", None)
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    knobs = [k for k in _LOGIT_KNOBS for c in (base, *configs) if getattr(c, k, None) is not None]
    return not knobs, None


def output_head(net) -> _Head | None:
    """The output layer of the model `net` runs, or None where the full path must run."""
    base = _unwrap(net)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or type(base) in _FULL_ONLY:
        return None
    ok, transform = _transform(base)
    if not ok:
        return None
    for name, module in base.named_modules():
        if module is head and name:
            parent, _, attr = name.rpartition(".")
            return _Head(base.get_submodule(parent), attr, head, transform)
    return None


def hidden_states(net, head: _Head, run: Callable[[torch.nn.Module], torch.Tensor]):
    """(final hidden states, the forward's autocast state), from run(net) (the model's own forward, returning its
    `.logits`) with the output layer swapped out; (None, None) if `.logits` shows the forward did more than that
    layer (then the model is remembered in _FULL_ONLY and the caller runs the full path). The update's passes
    and the probe pass (stages/probes.py) both read them."""
    stand_in = _PassThrough()
    setattr(head.parent, head.name, stand_in)
    try:
        with warnings.catch_warnings():  # FSDP2 warns that a root returning a view would lose its hook to an
            # in-place op (the hidden states are a slice): nothing here writes into them in place
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*", category=UserWarning)
            got = run(net)
    finally:
        setattr(head.parent, head.name, head.module)
    x, version, autocast = getattr(stand_in, "seen", (None, None, None))
    if x is not None and x._version == version:
        if got is x and head.transform is None:
            return got, autocast
        with torch.no_grad():
            want = x if head.transform is None else head.transform(x)
            same = got.shape == want.shape and torch.equal(got.to(want.dtype), want)
        if same:  # a wrapper's copy (DDP's sink, accelerate's fp32 outputs) keeps the graph through it
            return (got.to(x.dtype) if head.transform is None else x), autocast
    base = _unwrap(net)
    _FULL_ONLY.add(type(base))
    warnings.warn(
        f"{type(base).__name__}'s forward changes its output layer's result in a way rredcot's chunked "
        "log-probs do not reproduce: its log-probs are taken from the full [n, T, V] logits (more memory).",
        stacklevel=3,
    )
    return None, None
