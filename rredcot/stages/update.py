"""Update stage: the optimisation of one generation batch (the losses themselves: rredcot/losses.py).

Shapes: N completions in the generation batch (this rank's), T completion tokens, B rows per micro-batch.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from rredcot import collectives
from rredcot.logprobs import completion_logprobs, no_grad_logprobs
from rredcot.losses import sampler_correction, surrogate_stats
from rredcot.optim import grad_mode
from rredcot.registry import Entry, entry
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

    rows: torch.Tensor  # [spg, N / spg]: row s holds optimizer step s's rows (interleaved)
    mask: torch.Tensor  # [N, T] tokens in the loss: completion, defined reward, (not truncated)
    per_step: int  # rows per optimizer step (N / spg)
    accum: int  # micro-batches per optimizer step
    old: torch.Tensor | None  # [N, T] old log-probs when completions are reused, else None (rho == 1)
    ref: torch.Tensor | None  # [N, T] reference log-probs (beta > 0), else None
    loss: Entry  # the `loss` entry update.loss_type chose
    terms: Surrogate  # the update.* options of the per-token terms
    num_items: float  # dapo's denominator: active tokens of the whole generation batch, every rank's
    temperature: float
    max_completion_length: int


def update_policy(
    learner: Learner, rollout: Rollout, credit: Credit, cfg, *, temperature: float, max_completion_length: int
) -> dict[str, float]:
    """num_iterations x steps_per_generation optimizer steps on one generation batch of N completions.

    Each optimizer step takes N / steps_per_generation completions (step s: rows s, s + spg, s + 2 spg, ...;
    interleaved, so that the same global rows form step s at any world size), in micro-batches of
    cfg.micro_batch_size (gradient accumulation). Old log-probs are the detached current ones when each
    completion is used once (rho == 1); otherwise they are recomputed before the first step.

    Data parallel (N = this rank's rows, W ranks): DDP averages gradients over ranks, which is the global
    mean for the per-row losses (grpo, dr_grpo: every rank holds the same number of rows); dapo divides
    by the active tokens of the whole generation batch (all-reduced) and is scaled by W to undo the average.
    """
    N, T = rollout.completion_ids.shape
    valid = credit.valid.to(rollout.completion_mask.device)  # rewards come from the CPU verifiers
    mask = rollout.completion_mask * valid[:, None]  # [N, T]; undefined rewards are skipped
    if cfg.mask_truncated_completions:
        mask = mask * (~rollout.truncated)[:, None]
    reuse = cfg.num_iterations > 1 or cfg.steps_per_generation > 1
    stats: dict[str, list[float]] = {}
    with grad_mode(learner.model, cfg.get("autocast")):  # old and reference log-probs in the same precision as the new
        batch = (
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completion_ids,
            rollout.completion_mask,
            temperature,
            cfg.micro_batch_size,
        )
        per_step = N // cfg.steps_per_generation
        plan = Plan(
            rows=torch.arange(N, device=mask.device).view(-1, cfg.steps_per_generation).T,
            mask=mask,
            per_step=per_step,
            accum=per_step // cfg.micro_batch_size,
            old=no_grad_logprobs(learner.model, *batch)[0] if reuse else None,
            ref=no_grad_logprobs(learner.ref_model, *batch)[0] if cfg.beta > 0 else None,
            loss=entry("loss", cfg.loss_type),
            terms=Surrogate.from_cfg(cfg),
            num_items=collectives.total(float(mask.sum())),
            temperature=temperature,
            max_completion_length=max_completion_length,
        )
        for _ in range(cfg.num_iterations):
            for s in range(cfg.steps_per_generation):
                _optimizer_step(learner, rollout, credit, cfg, plan, s, stats)
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["lr"] = learner.scheduler.get_last_lr()[0]
    return out


def _optimizer_step(
    learner: Learner, rollout: Rollout, credit: Credit, cfg, plan: Plan, s: int, stats: dict[str, list[float]]
) -> None:
    """Optimizer step s: its micro-batches' backward passes, then one clipped step (skipped if not finite)."""
    for lo in range(0, plan.per_step, cfg.micro_batch_size):
        r = plan.rows[s, lo : lo + cfg.micro_batch_size]
        _micro_batch(learner, rollout, credit, cfg, plan, r, lo + cfg.micro_batch_size >= plan.per_step, stats)
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
    learner: Learner,
    rollout: Rollout,
    credit: Credit,
    cfg,
    plan: Plan,
    r: torch.Tensor,
    last: bool,
    stats: dict[str, list[float]],
) -> None:
    """Forward, loss and backward of the rows `r` [B] (gradients accumulate until the step's last one)."""
    logp, _ = completion_logprobs(
        learner.model,
        rollout.prompt_ids[r],
        rollout.prompt_mask[r],
        rollout.completion_ids[r],
        rollout.completion_mask[r],
        plan.temperature,
    )  # [B, T]
    old = logp.detach() if plan.old is None else plan.old[r]
    m = plan.mask[r].to(logp.dtype)
    sampler = None if rollout.sampler_logprobs is None else rollout.sampler_logprobs[r]
    w = _sampler_weights(cfg, old, sampler, m, stats)
    tok_loss, rho, kl = per_token_terms(
        logp,
        old,
        credit.advantages[r],
        ref_logp=None if plan.ref is None else plan.ref[r],
        is_weight=w,
        mask=m,
        surrogate=plan.loss.surrogate,
        options=plan.terms,
        sampler_logp=sampler,
    )
    loss = plan.loss.obj(tok_loss, m, max_completion_length=plan.max_completion_length, num_items=plan.num_items)
    logged = loss.item()
    # per-row losses: / accum; dapo, cispo, vespo (a global denominator): x W against DDP's mean over ranks
    loss = loss / plan.accum if plan.loss.divide_by_accum else loss * collectives.size()
    _backward(learner.accelerator, learner.model, loss, last)
    _append(
        stats, {"loss": logged}, surrogate_stats(plan.loss.surrogate, rho.detach(), credit.advantages[r], m, plan.terms)
    )
    if kl is not None:
        _append(stats, {"kl": float((kl.detach() * m).sum() / m.sum().clamp(min=1))})


def _sampler_weights(
    cfg, old: torch.Tensor, sampler: torch.Tensor | None, m: torch.Tensor, stats
) -> torch.Tensor | None:
    """The importance weights [B, T] or [B, 1] of tokens another engine sampled (rollout=vllm; None otherwise or
    with update.is_cap=0), in update.is_mode; the mismatch statistics go to `stats`."""
    if sampler is None:
        return None
    modes = (cfg.get("is_cap", 2.0), cfg.get("is_mode", "token_truncate"), cfg.get("is_cap_min", 0.0))
    w, mismatch = sampler_correction(old, sampler, m, *modes)
    _append(stats, mismatch)
    return w


def _backward(accelerator, model, loss: torch.Tensor, last: bool) -> None:
    """One micro-batch's backward. Gradients cross ranks once, on the optimizer step's last micro-batch
    (DDP's no_sync before it); a DeepSpeed engine, which steps inside backward, is told where the step ends."""
    accelerator.gradient_state._set_sync_gradients(last)  # accelerate's DeepSpeed wrapper reads it
    with nullcontext() if last else accelerator.no_sync(model):
        accelerator.backward(loss)


def _clips_itself(accelerator) -> bool:
    """A DeepSpeed engine clips and skips non-finite steps by its own config (its norm may not be reported)."""
    return accelerator.state.deepspeed_plugin is not None


def _append(stats: dict[str, list[float]], *dicts: dict[str, float]) -> None:
    for d in dicts:
        for k, v in d.items():
            stats.setdefault(k, []).append(v)
