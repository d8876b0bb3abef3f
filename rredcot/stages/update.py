"""Update stage: GRPO's group advantages, clipped surrogate and loss aggregations, at TRL parity.

Loss aggregations are the `update` registry (`update.loss_type=...`); see the README's "GRPO conventions".
Shapes: B rows in a micro-batch, T completion tokens, G completions per prompt.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch

from rredcot import distributed
from rredcot.logprobs import completion_logprobs, no_grad_logprobs
from rredcot.registry import get, register


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: rewards [N] (G consecutive rows per prompt) -> [N].

    Example, G=2, rewards [1, 0, 1, 1]: group means [.5, 1]; Bessel stds [.7071, 0]
      scale="group": [.5/(.7071+1e-4), -.5/(.7071+1e-4), 0, 0] = [.7070, -.7070, 0, 0]
      scale="none":  [.5, -.5, 0, 0]          (Dr. GRPO)
      scale="batch": [.5, -.5, 0, 0] / (std([1,0,1,1]) = .5 + 1e-4)
    NaN rewards (undefined) are left out of the group statistics and get advantage 0.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    r = rewards.view(-1, group_size).float()  # [N/G, G]
    valid = ~torch.isnan(r)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    mean, std = _group_stats(r)
    adv = r0 - mean
    if scale == "group":
        adv = adv / (std + eps)
    elif scale == "batch":
        pooled = distributed.pooled(r[valid])  # the whole generation batch's rewards, every rank's
        adv = adv / (pooled.std() + eps) if pooled.numel() > 1 else adv / (1 + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")
    return torch.where(valid, adv, torch.zeros_like(adv)).view(-1)


def _group_stats(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r [groups, G] with NaN for undefined rewards -> (mean, Bessel std) [groups, 1] over the defined ones
    (0 where a group has fewer than two)."""
    valid = ~torch.isnan(r)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    n = valid.sum(1, keepdim=True)
    mean = r0.sum(1, keepdim=True) / n.clamp(min=1)
    var = (((r0 - mean) * valid) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    return mean, var.sqrt()


def group_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] the Bessel std of each row's group, undefined (NaN) rewards left out.
    Example, G=3: [1, 0, nan] -> std of [1, 0] = .7071 for all three rows (NaN as 0 would give .5774)."""
    return _group_stats(rewards.view(-1, group_size).float())[1].expand(-1, group_size).reshape(-1)


def frac_zero_std(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (zero GRPO advantage: no signal)."""
    r = rewards.view(-1, group_size)
    return float(((r.max(1).values - r.min(1).values).abs() < 1e-8).float().mean())


def advantage_by_group(advantages: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor, group_size: int) -> dict[str, float]:
    """Where the credit goes, by group type: all right, mixed, all wrong (issue 11's collapse question).

    advantages, mask [N, T], correct [N] bool. `advantage/token_mean` is the mean advantage per active
    token; `advantage/mass_<type>` is that type's share of it (sum of its advantages over all active
    tokens: the three add up to token_mean). GRPO gives all-right and all-wrong groups exactly 0;
    a positive mass there is a push without a baseline.
    Example: G=2, rows (right, right | right, wrong), one token each, advantages (.5, .5 | .5, -.5):
    token_mean = 1/4 = .25, mass_all_right = (.5 + .5) / 4 = .25, mass_mixed = 0, frac_all_right = .5.
    """
    m = mask.to(advantages.dtype)
    per_row = (advantages * m).sum(-1).view(-1, group_size)  # [groups, G]
    right = correct.to(per_row.device).view(-1, group_size).sum(-1)  # [groups]
    kinds = {"all_right": right == group_size, "mixed": (right > 0) & (right < group_size), "all_wrong": right == 0}
    total = max(float(m.sum()), 1.0)
    out = {"advantage/token_mean": float(per_row.sum()) / total}
    for name, sel in kinds.items():
        out[f"advantage/mass_{name}"] = float(per_row[sel].sum()) / total
        out[f"groups/frac_{name}"] = float(sel.float().mean())
    return out


# ---- loss aggregations: per-token loss [B, T], mask [B, T] -> scalar --------------------------------
# `divide_by_accum` says whether the trainer divides by the gradient-accumulation steps (all but dapo).


@register("update", "grpo")
def agg_grpo(loss: torch.Tensor, mask: torch.Tensor, **_: object) -> torch.Tensor:
    """Mean over rows of each row's token mean."""
    return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@register("update", "bnpo")
def agg_bnpo(loss: torch.Tensor, mask: torch.Tensor, **_: object) -> torch.Tensor:
    """Token mean over the micro-batch."""
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


@register("update", "dr_grpo")
def agg_dr_grpo(loss: torch.Tensor, mask: torch.Tensor, *, max_completion_length: int | None = None, **_: object) -> torch.Tensor:
    """Sum over tokens / (B * max_completion_length): no length bias."""
    length = max_completion_length or loss.shape[1]
    return (loss * mask).sum() / (loss.shape[0] * length)


@register("update", "dapo")
def agg_dapo(loss: torch.Tensor, mask: torch.Tensor, *, num_items: float | None = None, **_: object) -> torch.Tensor:
    """Sum over tokens / active tokens of the whole batch (num_items; default: this batch's)."""
    denom = float(mask.sum()) if num_items is None else float(num_items)
    return (loss * mask).sum() / max(denom, 1.0)


for _name, _fn in (("grpo", agg_grpo), ("bnpo", agg_bnpo), ("dr_grpo", agg_dr_grpo), ("dapo", agg_dapo)):
    _fn.divide_by_accum = _name != "dapo"  # type: ignore[attr-defined]


def per_token_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(per-token loss [B, T], ratio rho [B, T], k3 KL [B, T] or None). advantages [B] or [B, T].

    Example: logp = old_logp (rho = 1), A = 2: loss = -min(1 * 2, 1 * 2) = -2 per token.
    rho = 1.5, A = 1: -min(1.5, clip(1.5, .8, 1.2) = 1.2) = -1.2 (clipped); A = -1: -min(-1.5, -1.2) = 1.5.
    is_weight [B, T] (an external sampler's truncated importance weight) scales the surrogate, not the KL.
    """
    adv = advantages if advantages.ndim == 2 else advantages[:, None]  # [B, T] or [B, 1]
    rho = torch.exp(logp - old_logp)
    clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(rho * adv, clipped * adv)
    if is_weight is not None:
        loss = loss * is_weight
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1  # k3 >= 0; e.g. delta = .1 -> 1.10517 - .1 - 1 = .00517
        loss = loss + beta * kl
    return loss, rho, kl


def sampler_correction(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                       cap: float) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Truncated importance weights for tokens another engine sampled (vLLM), and the mismatch stats.

    w = min(exp(old_logp - sampler_logp), cap) per token [B, T] (None when cap == 0: no correction).
    Example: old -1.0, sampler -1.5: w = e^0.5 = 1.65; old -1.0, sampler -2.0, cap 2: min(e^1, 2) = 2.
    """
    m = mask.bool()
    diff = (old_logp - sampler_logp)[m]
    ratio = torch.exp(old_logp - sampler_logp)
    stats = {"sampler/logp_diff_mean": float(diff.abs().mean()) if diff.numel() else 0.0,
             "sampler/logp_diff_max": float(diff.abs().max()) if diff.numel() else 0.0,
             "sampler/is_ratio_mean": float(ratio[m].mean()) if diff.numel() else 1.0}
    if cap <= 0:
        return None, stats
    stats["sampler/is_capped_frac"] = float((ratio[m] > cap).float().mean()) if diff.numel() else 0.0
    return ratio.clamp(max=cap), stats


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_items: float | None = None,
) -> torch.Tensor:
    """GRPO's clipped surrogate (+ beta * k3 KL), aggregated by `loss_type`. Returns a scalar.

    logp, old_logp, ref_logp, mask: [B, T]; advantages: [B] or [B, T]. Not divided by the
    gradient-accumulation steps: the trainer does that for the types whose `divide_by_accum` is set.
    """
    loss, _, _ = per_token_terms(logp, old_logp, advantages, eps_low=eps_low, eps_high=eps_high, beta=beta, ref_logp=ref_logp)
    agg: Callable[..., torch.Tensor] = get("update", loss_type)
    return agg(loss, mask.to(loss.dtype), max_completion_length=max_completion_length, num_items=num_items)


def clip_stats(rho: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float) -> dict[str, float]:
    """TRL's clip ratios: tokens clipped below with A < 0, above with A > 0, and either (masked means)."""
    adv = advantages if advantages.ndim == 2 else advantages[:, None].expand_as(rho)
    low = (rho < 1 - eps_low) & (adv < 0)
    high = (rho > 1 + eps_high) & (adv > 0)
    m = mask.bool()
    denom = max(float(m.sum()), 1.0)
    return {
        "clip_ratio/low_mean": float((low & m).sum()) / denom,
        "clip_ratio/high_mean": float((high & m).sum()) / denom,
        "clip_ratio/region_mean": float(((low | high) & m).sum()) / denom,
    }


# ---- the optimisation of one generation batch ------------------------------------------------------


def update_policy(model, rollout, credit, *, cfg, temperature: float, max_completion_length: int, optimizer,
                  scheduler, accelerator, ref_model=None) -> dict[str, float]:
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
    # [spg, N / spg]: row s of it is optimizer step s's rows (interleaved)
    rows = torch.arange(N, device=mask.device).view(-1, cfg.steps_per_generation).T
    per_step = N // cfg.steps_per_generation
    accum = per_step // cfg.micro_batch_size
    reuse = cfg.num_iterations > 1 or cfg.steps_per_generation > 1
    agg = get("update", cfg.loss_type)
    num_items = distributed.total(float(mask.sum()))  # dapo: active tokens of the whole generation batch, all ranks
    stats: dict[str, list[float]] = {}
    with _grad_mode(model, cfg.get("autocast")):  # old and reference log-probs in the same precision as the new
        batch = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, temperature,
                 cfg.micro_batch_size)
        old_all = no_grad_logprobs(model, *batch)[0] if reuse else None
        ref_all = no_grad_logprobs(ref_model, *batch)[0] if cfg.beta > 0 else None
        _optimise(model, rollout, credit, cfg, rows, mask, per_step, accum, old_all, ref_all, agg, num_items, stats,
                  temperature, max_completion_length, optimizer, scheduler, accelerator)
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["lr"] = scheduler.get_last_lr()[0]
    return out


@contextmanager
def _grad_mode(model, autocast: str | None = None):
    """Train mode for the gradient passes when activations are checkpointed (transformers checkpoints only
    in train mode); every other pass (rollout, probes: KV caches) keeps the model as it was. With
    `autocast` the passes compute in that dtype; the log-probs are taken from fp32 logits either way."""
    unwrapped = getattr(model, "module", model)
    was = model.training
    device = next(model.parameters()).device.type
    cast = torch.autocast(device, dtype=getattr(torch, autocast)) if autocast else nullcontext()
    on = getattr(unwrapped, "is_activation_checkpointing", None)  # transformers 5 (also through a peft wrapper)
    if on is None:
        on = getattr(unwrapped, "is_gradient_checkpointing", False)
    if on:
        model.train()
    try:
        with cast:
            yield
    finally:
        model.train(was)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers 5 renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place (regional compilation: one small graph reused by every
    layer, so the first step compiles in seconds to minutes, not the whole model). Shapes are dynamic
    (lengths change every step); parameter names, checkpoints and results are unchanged (tested).
    Returns the number of layers compiled."""
    from rredcot.errors import UserError
    from rredcot.lora import base_model

    base = base_model(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"update.compile=true compiles the decoder layers (model.model.layers), which "
                        f"{type(base).__name__} does not have. Set update.compile=false.")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def _optimise(model, rollout, credit, cfg, rows, mask, per_step, accum, old_all, ref_all, agg, num_items, stats,
              temperature, max_completion_length, optimizer, scheduler, accelerator) -> None:
    """The optimizer steps of update_policy (stats are appended to `stats`)."""
    for _ in range(cfg.num_iterations):
        for s in range(cfg.steps_per_generation):
            for lo in range(0, per_step, cfg.micro_batch_size):
                r = rows[s, lo : lo + cfg.micro_batch_size]
                logp, _ = completion_logprobs(model, rollout.prompt_ids[r], rollout.prompt_mask[r],
                                              rollout.completion_ids[r], rollout.completion_mask[r], temperature)
                old = logp.detach() if old_all is None else old_all[r]
                ref = None if ref_all is None else ref_all[r]
                w = None
                if rollout.sampler_logprobs is not None:  # another engine sampled these tokens (rollout=vllm)
                    w, mismatch = sampler_correction(old, rollout.sampler_logprobs[r], mask[r], cfg.get("is_cap", 2.0))
                    _append(stats, mismatch)
                tok_loss, rho, kl = per_token_terms(logp, old, credit.advantages[r], eps_low=cfg.eps_low,
                                                    eps_high=cfg.eps_high, beta=cfg.beta, ref_logp=ref, is_weight=w)
                m = mask[r].to(tok_loss.dtype)
                loss = agg(tok_loss, m, max_completion_length=max_completion_length, num_items=num_items)
                logged = loss.item()
                # per-row losses: / accum; dapo (global denominator): x W against DDP's mean over ranks
                loss = loss / accum if agg.divide_by_accum else loss * distributed.size()
                _backward(accelerator, model, loss, last=lo + cfg.micro_batch_size >= per_step)
                _append(stats, {"loss": logged},
                        clip_stats(rho.detach(), credit.advantages[r], m, cfg.eps_low, cfg.eps_high))
                if kl is not None:
                    _append(stats, {"kl": float((kl.detach() * m).sum() / m.sum().clamp(min=1))})
            norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            grad_norm = float("nan") if norm is None else float(norm)  # None: DeepSpeed's engine clips (and reports none)
            finite = math.isfinite(grad_norm) or _clips_itself(accelerator)
            if finite:  # a NaN/inf gradient would poison every weight: skip the step (counted, see pipeline)
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            _append(stats, {"grad_norm": grad_norm if finite else float("nan"), "skipped_nonfinite": float(not finite)})


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


def build_optimizer(model, cfg, total_steps: int):
    """AdamW and a warmup + constant/cosine schedule over `total_steps` optimizer steps."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
    )
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    kind = {"constant": "constant_with_warmup", "cosine": "cosine"}[cfg.schedule]
    return opt, get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total_steps)
