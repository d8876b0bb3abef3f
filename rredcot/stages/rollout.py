"""Rollout stage: sampling completions through a rollout backend.

A backend (registry stage `rollout`, chosen by `rollout=NAME`) generates token ids and their
log-probs: `sample` is the reference, the trainer's model with its KV cache; `vllm`
(stages/vllm_backend.py) is vLLM, colocated or a server. `sample_rollout` turns any backend's output into the
Rollout the other stages read. Sampling arithmetic and seeds: stages/sampling.py.

The reference loop keeps, for free, each sampled token's log-prob and the entropy of the distribution
it was drawn from (the segmenters use the entropies). Log-probs use temperature-scaled logits before
top-k/top-p filtering, the same distribution the update's log-probs use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rredcot.logprobs import no_grad_logprobs, position_ids
from rredcot.lora import base_model
from rredcot.ranges import COUNT, number
from rredcot.registry import register
from rredcot.stages.sampling import draw, filter_logits, keyed_uniforms, pad_cat
from rredcot.types import Rollout, RolloutKV, Sample


def forward_takes(model, name: str) -> bool:
    """Whether the model's own forward has argument `name` (through a peft wrapper, whose forward takes **kwargs)."""
    import inspect

    return name in inspect.signature(base_model(model).forward).parameters


def cache_kwarg(model) -> str:
    """The forward's KV-cache argument: `cache` since transformers 5 (`past_key_values` is deprecated)."""
    return "cache" if forward_takes(model, "cache") else "past_key_values"


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation_config EOS ids
    (Qwen models stop on <|im_end|> and <|endoftext|>)."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    eos_id: int | list[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    uniforms: torch.Tensor | None = None,
    keep_cache: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Sample completions for left-padded prompts [N, P].

    Returns completion_ids, completion_mask, logprobs, entropies (all [N, T], T <= max_new_tokens)
    and truncated [N]. Rows stop at any of the EOS ids (included in the mask); the loop ends when all
    have stopped. Token t of row i is drawn with uniforms[i, t] ([N, >= max_new_tokens], keyed per row:
    a row's completion does not depend on which other rows share its batch); None: torch's generator.
    keep_cache: also return the KV cache and how many completion tokens it holds (all but the last sampled one:
    no forward is spent on a token nothing will be sampled after).
    """
    n = prompt_ids.shape[0]
    mask = prompt_mask.clone()
    pos = position_ids(mask)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers 5 / 4
    done = torch.zeros(n, dtype=torch.bool, device=prompt_ids.device)
    stops = torch.tensor(eos_id if isinstance(eos_id, (list, tuple)) else [eos_id], device=prompt_ids.device)
    kw = cache_kwarg(model)
    toks, alive, logps, ents = [], [], [], []
    pos = pos[:, -1:]
    div = 1.0 if greedy else temperature
    p_logp = None  # [N, V] scratch for p * log p, reused every step (fresh [N, V] tensors also pay for new pages)
    for t in range(max_new_tokens):
        scaled = out.logits[:, -1].float()  # [N, V]
        scaled = scaled if div == 1.0 else scaled / div  # x / 1.0 is x: no copy
        logp_all = torch.log_softmax(scaled, dim=-1)
        if greedy:
            tok = scaled.argmax(-1)
        else:
            probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
            u = uniforms[:, len(toks)] if uniforms is not None else torch.rand(n, device=probs.device)
            tok = draw(probs, u)  # [N]
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        toks.append(tok)
        alive.append(~done)
        logps.append(logp_all.gather(-1, tok[:, None]).squeeze(-1))
        # the entropy -sum p log p from this step's log_softmax (entropy_from_logits would compute a second one):
        # bitwise the same numbers, 1.29x the tokens/s at a 151,936-token vocabulary (benchmarks/rollout.py)
        p_logp = torch.exp(logp_all, out=p_logp if p_logp is not None else torch.empty_like(logp_all))
        ents.append(-p_logp.mul_(logp_all).sum(-1))
        done = done | torch.isin(tok, stops)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache})
    completion_mask = torch.stack(alive, 1).long()  # [N, T]
    logprobs = torch.stack(logps, 1) * completion_mask
    entropies = torch.stack(ents, 1) * completion_mask
    out = (torch.stack(toks, 1), completion_mask, logprobs, entropies, ~done)
    return (*out, cache, len(toks) - 1) if keep_cache else out


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn (the rollout.* keys every backend honours)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False


@dataclass
class Generations:
    """A backend's answer for N left-padded prompts: [N, T] tensors on the trainer's device."""

    ids: torch.Tensor  # [N, T] sampled tokens, pad after the stop token
    mask: torch.Tensor  # [N, T] 1 up to and including the stop token
    logprobs: torch.Tensor  # [N, T] the sampler's log-prob of each token (temperature-scaled logits)
    entropies: torch.Tensor | None  # [N, T] the sampler's entropy per step; None: the sampler does not give them
    truncated: torch.Tensor  # [N] bool, no stop token within the budget
    kv: list[RolloutKV] | None = None  # the sampler's KV caches, when asked for and the backend has them


class RolloutBackend:
    """What generates completions. `external` backends sample with their own copy of the weights (vLLM):
    the trainer re-scores their tokens, and the update corrects for the mismatch (update.is_cap).

    generate(prompt_ids [N, P], prompt_mask [N, P], sampling, budgets=None, seeds=None) -> Generations
      seeds: N per-row sampling seeds (row_seed); row i's completion must depend only on its prompt,
      the weights and seeds[i], so a run gives the same completions at any world size
    sync(model): the trainer's weights changed (after every optimizer step); the next generate uses them
    sleep() / wake(): free and take back the sampler's accelerator memory around the gradient passes
    """

    external = False
    keeps_kv = False  # generate(..., keep_kv=True) returns its KV caches (Generations.kv)
    chunk_size = 256
    score_batch_size = 8  # rows per trainer forward when an external backend's tokens are re-scored

    def generate(
        self,
        prompt_ids,
        prompt_mask,
        sampling: Sampling,
        budgets: list[int] | None = None,
        seeds: list[int] | None = None,
    ) -> Generations:
        raise NotImplementedError

    def sync(self, model) -> None:
        pass

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


class KVCacheBackend(RolloutBackend):
    """The reference backend: the trainer's own model sampled with its KV cache, `chunk_size` rows at a
    time. Its log-probs are the trainer's, so there is nothing to correct and nothing to copy. With keep_kv
    the chunks' caches are returned for the answer-forcing probes (held until the trainer drops them: the
    whole batch's cache at once, not one chunk's)."""

    keeps_kv = True

    def __init__(self, model, tokenizer, chunk_size: int = 256, kv_keep_gb: float = 8.0):
        self.model, self.tokenizer, self.chunk_size, self.kv_keep_gb = model, tokenizer, chunk_size, kv_keep_gb

    def sync(self, model) -> None:
        self.model = model

    def generate(
        self,
        prompt_ids,
        prompt_mask,
        sampling: Sampling,
        budgets: list[int] | None = None,
        seeds: list[int] | None = None,
        keep_kv: bool = False,
    ) -> Generations:
        model, tok = self.model, self.tokenizer
        was_training = model.training
        model.eval()
        parts, kv = [], []
        for lo in range(0, prompt_ids.shape[0], self.chunk_size):
            sl = slice(lo, lo + self.chunk_size)
            budget = max(budgets[sl]) if budgets else sampling.max_new_tokens
            u = keyed_uniforms(seeds[sl], budget).to(prompt_ids.device) if seeds and not sampling.greedy else None
            parts.append(
                generate(
                    model,
                    prompt_ids[sl],
                    prompt_mask[sl],
                    eos_id=stop_ids(model, tok),
                    pad_id=tok.pad_token_id,
                    max_new_tokens=budget,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    greedy=sampling.greedy,
                    uniforms=u,
                    keep_cache=keep_kv,
                )
            )
            if keep_kv:
                kept = _rollout_kv(lo, prompt_mask[sl], parts[-1], model)
                if sum(_nbytes(c.cache) for c in [*kv, kept]) <= self.kv_keep_gb * 2**30:
                    kv.append(kept)  # past the budget a chunk's probes re-forward its traces: slower, never more memory
                parts[-1] = parts[-1][:5]
        model.train(was_training)
        fill = (tok.pad_token_id, 0, 0.0, 0.0)
        ids, mask, logp, ent = (pad_cat([p[i] for p in parts], fill[i]) for i in range(4))
        return Generations(ids, mask, logp, ent, torch.cat([p[4] for p in parts]), kv=kv or None)


def _nbytes(cache) -> int:
    """Bytes of a DynamicCache's keys and values."""
    layers = getattr(cache, "layers", [])
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)


def _rollout_kv(lo: int, prompt_mask: torch.Tensor, out: tuple, model) -> RolloutKV:
    """A chunk's cache and where each row's trace lies in it: prompt_mask [n, P]; out: generate()'s 7-tuple."""
    plen = prompt_mask.sum(-1)  # [n] real prompt tokens (left padding before them)
    fed = out[1].sum(-1).clamp(max=out[6])  # [n] completion tokens in the cache
    return RolloutKV(lo, out[5], (prompt_mask.shape[1] - plen).tolist(), (plen + fed).tolist(), model)


@register("rollout", "sample", rules={"chunk_size": COUNT, "kv_keep_gb": number(0)})
def kv_cache_backend(model, tokenizer, *, chunk_size: int = 256, kv_keep_gb: float = 8.0) -> KVCacheBackend:
    """rollout=sample: the built-in sampler (any transformers causal LM, CPU or GPU)."""
    return KVCacheBackend(model, tokenizer, chunk_size, kv_keep_gb)


def as_backend(model_or_backend, tokenizer) -> RolloutBackend:
    """A backend as is; a model gets the reference backend (tests, scripts, plug-ins calling the stage)."""
    return (
        model_or_backend
        if isinstance(model_or_backend, RolloutBackend)
        else KVCacheBackend(model_or_backend, tokenizer)
    )


def trainer_scores(
    model, prompt_ids, prompt_mask, ids, mask, temperature: float, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's log-probs and entropies [N, T] of another engine's tokens (eval mode, no gradients)."""
    was = model.training
    model.eval()
    lp, ent = no_grad_logprobs(model, prompt_ids, prompt_mask, ids, mask, temperature, batch, with_entropy=True)
    model.train(was)
    return lp * mask, ent * mask


def sample_rollout(
    backend,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    score: bool = True,
    seeds: list[int] | None = None,
    keep_kv: bool = False,
) -> Rollout:
    """`group_size` completions for each sample from `backend` (or a model: the reference backend).

    seeds: one per completion (len(samples) * group_size, row_seeds): keyed sampling; None: torch's generator.

    An external backend's tokens are re-scored by the trainer (log-probs, entropies) when `score`
    (evaluation needs neither); its own log-probs are kept as `sampler_logprobs` for the update's
    importance correction. keep_kv: keep the sampler's KV caches (Rollout.kv) for the probes, where the backend
    has them (rollout=sample)."""
    backend = as_backend(backend, tokenizer)
    repeated = [s for s in samples for _ in range(group_size)]
    device = next(backend.model.parameters()).device
    enc = tokenizer([s.prompt for s in repeated], return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids, prompt_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    sampling = Sampling(max_new_tokens, temperature, top_p, top_k, greedy)
    extra = {"seeds": seeds} if seeds is not None else {}
    if keep_kv and backend.keeps_kv:
        extra["keep_kv"] = True
    gen = backend.generate(prompt_ids, prompt_mask, sampling, **extra)
    logp, ent, sampler_logp = gen.logprobs, gen.entropies, None
    if backend.external:
        sampler_logp = gen.logprobs
        if score:
            logp, ent = trainer_scores(
                backend.model, prompt_ids, prompt_mask, gen.ids, gen.mask, temperature, backend.score_batch_size
            )
    if ent is None:
        ent = torch.zeros_like(logp)
    texts = tokenizer.batch_decode(gen.ids.masked_fill(gen.mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    return Rollout(
        prompt_ids,
        prompt_mask,
        gen.ids,
        gen.mask,
        logp,
        ent,
        gen.truncated,
        texts,
        repeated,
        group_size,
        sampler_logprobs=sampler_logp,
        kv=gen.kv,
    )
