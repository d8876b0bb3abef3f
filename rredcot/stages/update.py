"""Update stage: the optimisation of one generation batch (the losses themselves: rredcot/losses.py; which rows and
columns each forward/backward takes: rredcot/stages/micro_batches.py).

Shapes: N completions in the generation batch (this rank's), T completion columns, B rows in a micro-batch (t of
its completion columns kept), S = N / steps_per_generation rows per optimizer step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from rredcot import collectives
from rredcot.logprobs import completion_logprobs
from rredcot.losses import agg_bnpo, sampler_correction, surrogate_stats
from rredcot.optim import grad_mode
from rredcot.registry import Entry, entry
from rredcot.stages.micro_batches import Micro, extents, plan_steps
from rredcot.surrogates import Surrogate, per_token_terms
from rredcot.types import Credit, Rollout


@dataclass
class Learner:
    """The trained policy and what steps it (built once by the trainer, after accelerator.prepare)."""

    model: Any
    optimizer: Any
    scheduler: Any
    accelerator: Any
    ref_model: Any = None  # the frozen reference for the KL (update.beta > 0), else None


@dataclass
class Plan:
    """What every micro-batch of one generation batch shares (made once per step by `update_policy`)."""

    rows: torch.Tensor  # [spg, S]: row s holds optimizer step s's rows (interleaved)
    micro: list[list[Micro]]  # optimizer step s's micro-batches: its rows, each once, and the columns they keep
    mask: torch.Tensor  # [N, T] tokens in the loss: completion, defined reward, (not truncated)
    per_step: int  # rows per optimizer step (S)
    accum: int  # chunks of micro_batch_size rows per optimizer step (the logged stats' micro-batches)
    chunk_tokens: torch.Tensor | None  # [N] with a token budget: the tokens of each row's chunk (bnpo); else None
    old: torch.Tensor | None  # [N, T] old log-probs when completions are reused, else None (rho == 1)
    ref: torch.Tensor | None  # [N, T] reference log-probs (beta > 0), else None
    loss: Entry  # the `loss` entry update.loss_type chose
    terms: Surrogate  # the update.* options of the per-token terms
    num_items: float  # dapo's denominator: active tokens of the whole generation batch, every rank's
    temperature: float
    max_completion_length: int


@dataclass
class Seen:
    """An optimizer step's per-token terms [S, T] by position in its rows, kept for the logged statistics (columns a
    micro-batch did not forward stay at the fill, outside the mask)."""

    tok: torch.Tensor  # per-token loss (0)
    rho: torch.Tensor  # importance ratio (1)
    old: torch.Tensor  # old log-probs (0)
    kl: torch.Tensor | None  # k3 KL (0) when beta > 0

    @classmethod
    def empty(cls, plan: Plan) -> Seen:
        shape, dev = (plan.per_step, plan.mask.shape[1]), plan.mask.device
        kl = None if plan.ref is None else torch.zeros(shape, device=dev)
        return cls(torch.zeros(shape, device=dev), torch.ones(shape, device=dev), torch.zeros(shape, device=dev), kl)

    def put(self, mb: Micro, tok: torch.Tensor, rho: torch.Tensor, old: torch.Tensor, kl: torch.Tensor | None) -> None:
        for buf, x in ((self.tok, tok), (self.rho, rho), (self.old, old), (self.kl, kl)):
            if buf is not None:
                buf[mb.pos, : mb.t] = x.detach()


def update_policy(
    learner: Learner, rollout: Rollout, credit: Credit, cfg, *, temperature: float, max_completion_length: int
) -> dict[str, float]:
    """num_iterations x steps_per_generation optimizer steps on one generation batch of N completions.

    Each optimizer step takes N / steps_per_generation completions (step s: rows s, s + spg, s + 2 spg, ...;
    interleaved, so that the same global rows form step s at any world size), in micro-batches (gradient
    accumulation) of cfg.micro_batch_size rows, or of cfg.micro_batch_tokens tokens when set; each forwards only
    the columns its rows use. Old log-probs are the detached current ones when each completion is used once
    (rho == 1); otherwise they are computed before the first step, through the same micro-batches.

    Data parallel (N = this rank's rows, W ranks): DDP averages gradients over ranks, which is the global
    mean for the per-row losses (grpo, dr_grpo: every rank holds the same number of rows); dapo divides
    by the active tokens of the whole generation batch (all-reduced) and is scaled by W to undo the average.
    With a token budget every rank runs as many micro-batches per step as the one that packed the most
    (micro_batches.matched: FSDP2 and ZeRO passes are collectives).
    """
    N, T = rollout.completion_ids.shape
    valid = credit.valid.to(rollout.completion_mask.device)  # rewards come from the CPU verifiers
    mask = rollout.completion_mask * valid[:, None]  # [N, T]; undefined rewards are skipped
    if cfg.mask_truncated_completions:
        mask = mask * (~rollout.truncated)[:, None]
    reuse = cfg.num_iterations > 1 or cfg.steps_per_generation > 1
    rows = torch.arange(N, device=mask.device).view(-1, cfg.steps_per_generation).T
    micro = plan_steps(rows, cfg, *extents(rollout.prompt_mask, rollout.completion_mask))
    stats: dict[str, list[float]] = {}
    with grad_mode(learner.model, cfg.get("autocast")):  # old and reference log-probs in the same precision as the new
        per_step = N // cfg.steps_per_generation
        plan = Plan(
            rows=rows,
            micro=micro,
            mask=mask,
            per_step=per_step,
            accum=per_step // cfg.micro_batch_size,
            chunk_tokens=None if cfg.get("micro_batch_tokens") is None else _chunk_tokens(mask, rows, cfg),
            old=_no_grad(learner.model, rollout, micro, temperature) if reuse else None,
            ref=_no_grad(learner.ref_model, rollout, micro, temperature) if cfg.beta > 0 else None,
            loss=entry("loss", cfg.loss_type),
            terms=Surrogate.from_cfg(cfg),
            num_items=collectives.total(float(mask.sum())),
            temperature=temperature,
            max_completion_length=max_completion_length or T,  # dr_grpo's: never the trimmed width
        )
        for _ in range(cfg.num_iterations):
            for s in range(cfg.steps_per_generation):
                _optimizer_step(learner, rollout, credit, cfg, plan, s, stats)
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["lr"] = learner.scheduler.get_last_lr()[0]
    return out


def _chunk_tokens(mask: torch.Tensor, rows: torch.Tensor, cfg) -> torch.Tensor:
    """[N]: the active tokens (at least 1) of each row's chunk, the micro_batch_size rows of its step that formed
    its micro-batch without a token budget: bnpo's denominator, so that a budget does not change it."""
    spg, S = rows.shape
    size = cfg.micro_batch_size
    per_chunk = mask.float().sum(-1)[rows].view(spg, S // size, size).sum(-1, keepdim=True).clamp(min=1.0)
    out = torch.empty(mask.shape[0], device=mask.device)
    out[rows.reshape(-1)] = per_chunk.expand(-1, -1, size).reshape(-1)
    return out


def _no_grad(model, rollout: Rollout, micro: list[list[Micro]], temperature: float) -> torch.Tensor:
    """The model's log-probs [N, T] (old policy, reference) without gradients, through the update's micro-batches:
    the columns a gradient pass reads are the ones forwarded here (the others stay 0 and are never read)."""
    out = torch.zeros(rollout.completion_ids.shape, device=rollout.completion_ids.device)
    with torch.no_grad():
        for mb in (m for step in micro for m in step):
            lp, _ = _logprobs(model, rollout, mb, temperature)
            out[mb.rows, : mb.t] = lp
    return out


def _logprobs(model, rollout: Rollout, mb: Micro, temperature: float) -> tuple[torch.Tensor, None]:
    """[B, t] log-probs of the micro-batch's completion tokens, from its kept columns only."""
    return completion_logprobs(
        model,
        mb.prompt(rollout.prompt_ids),
        mb.prompt(rollout.prompt_mask),
        mb.completion(rollout.completion_ids),
        mb.completion(rollout.completion_mask),
        temperature,
    )


def _optimizer_step(
    learner: Learner, rollout: Rollout, credit: Credit, cfg, plan: Plan, s: int, stats: dict[str, list[float]]
) -> None:
    """Optimizer step s: its micro-batches' backward passes, then one clipped step (skipped if not finite)."""
    seen = Seen.empty(plan)
    for i, mb in enumerate(plan.micro[s]):
        _micro_batch(learner, rollout, credit, cfg, plan, mb, i == len(plan.micro[s]) - 1, seen)
    _log_chunks(rollout, credit, cfg, plan, s, seen, stats)
    acc = learner.accelerator
    norm = acc.clip_grad_norm_(learner.model.parameters(), cfg.max_grad_norm)
    grad_norm = float("nan") if norm is None else float(norm)  # None: DeepSpeed's engine clips (and reports none)
    finite = math.isfinite(grad_norm) or _clips_itself(acc)
    if finite:  # a NaN/inf gradient would poison every weight: skip the step (counted, see the trainer)
        learner.optimizer.step()
    learner.scheduler.step()
    learner.optimizer.zero_grad(set_to_none=True)
    _append(stats, {"grad_norm": grad_norm if finite else float("nan"), "skipped_nonfinite": float(not finite)})


def _micro_batch(
    learner: Learner, rollout: Rollout, credit: Credit, cfg, plan: Plan, mb: Micro, last: bool, seen: Seen
) -> None:
    """Forward, loss and backward of the micro-batch `mb` (gradients accumulate until the step's last one).
    DDP decides in the forward whether the next backward reduces over ranks (torch's DDP.no_sync: "the forward
    pass should be included inside the context manager"), so no_sync covers the forward too."""
    with nullcontext() if last else learner.accelerator.no_sync(learner.model):
        logp, _ = _logprobs(learner.model, rollout, mb, plan.temperature)  # [B, t]
        old = logp.detach() if plan.old is None else mb.completion(plan.old)
        m = mb.completion(plan.mask).to(logp.dtype)
        sampler = None if rollout.sampler_logprobs is None else mb.completion(rollout.sampler_logprobs)
        tok_loss, rho, kl = per_token_terms(
            logp,
            old,
            mb.completion(credit.advantages),
            ref_logp=None if plan.ref is None else mb.completion(plan.ref),
            is_weight=_sampler_weights(cfg, old, sampler, m),
            mask=m,
            surrogate=plan.loss.surrogate,
            options=plan.terms,
            sampler_logp=sampler,
        )
        seen.put(mb, tok_loss, rho, old, kl)
        _backward(learner.accelerator, _share(plan, mb, tok_loss, m), last)


def _share(plan: Plan, mb: Micro, tok_loss: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The micro-batch's part of the step's loss, weighted so that the parts add up to the loss of micro_batch_size
    rows a micro-batch, however the rows were packed: a per-row loss (grpo, dr_grpo, luspo, sapo: a mean over the
    micro-batch's rows) x B / S (1 / accum at micro_batch_size rows); bnpo under a token budget: each row's token
    sum over its chunk's tokens (_chunk_tokens) / accum; a global denominator (dapo, cispo, vespo): x W against
    DDP's mean over ranks."""
    if plan.chunk_tokens is not None and plan.loss.obj is agg_bnpo:
        return ((tok_loss * m).sum(-1) / plan.chunk_tokens[mb.rows]).sum() / plan.accum
    loss = plan.loss.obj(tok_loss, m, max_completion_length=plan.max_completion_length, num_items=plan.num_items)
    if not plan.loss.divide_by_accum:
        return loss * collectives.size()
    return loss / (plan.per_step / len(mb.rows))  # S / B is exactly accum at micro_batch_size rows


def _log_chunks(
    rollout: Rollout, credit: Credit, cfg, plan: Plan, s: int, seen: Seen, stats: dict[str, list[float]]
) -> None:
    """What is logged per micro-batch (loss, clip ratios, KL, sampler mismatch), on the step's chunks of
    micro_batch_size rows, whatever the forward's partition: a token budget changes no logged number."""
    size = cfg.micro_batch_size
    for lo in range(0, plan.per_step, size):
        pos, r = slice(lo, lo + size), plan.rows[s, lo : lo + size]
        m = plan.mask[r].to(seen.tok.dtype)
        if rollout.sampler_logprobs is not None:
            _append(stats, sampler_correction(seen.old[pos], rollout.sampler_logprobs[r], m, *_is_modes(cfg))[1])
        kw = {"max_completion_length": plan.max_completion_length, "num_items": plan.num_items}
        loss = {"loss": plan.loss.obj(seen.tok[pos], m, **kw).item()}
        adv = credit.advantages[r]
        _append(stats, loss, surrogate_stats(plan.loss.surrogate, seen.rho[pos], adv, m, plan.terms))
        if seen.kl is not None:
            _append(stats, {"kl": float((seen.kl[pos] * m).sum() / m.sum().clamp(min=1))})


def _is_modes(cfg) -> tuple[float, str, float]:
    return cfg.get("is_cap", 2.0), cfg.get("is_mode", "token_truncate"), cfg.get("is_cap_min", 0.0)


def _sampler_weights(cfg, old: torch.Tensor, sampler: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor | None:
    """The importance weights [B, t] or [B, 1] of tokens another engine sampled (rollout=vllm; None otherwise or
    with update.is_cap=0), in update.is_mode (the mismatch statistics: _log_chunks)."""
    if sampler is None:
        return None
    return sampler_correction(old, sampler, m, *_is_modes(cfg))[0]


def _backward(accelerator, loss: torch.Tensor, last: bool) -> None:
    """One micro-batch's backward (inside no_sync but on the step's last one); a DeepSpeed engine, which steps
    inside backward, is told where the step ends."""
    accelerator.gradient_state._set_sync_gradients(last)  # accelerate's DeepSpeed wrapper reads it
    accelerator.backward(loss)


def _clips_itself(accelerator) -> bool:
    """A DeepSpeed engine clips and skips non-finite steps by its own config (its norm may not be reported)."""
    return accelerator.state.deepspeed_plugin is not None


def _append(stats: dict[str, list[float]], *dicts: dict[str, float]) -> None:
    for d in dicts:
        for k, v in d.items():
            stats.setdefault(k, []).append(v)
