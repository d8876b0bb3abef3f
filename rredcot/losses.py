"""Losses: GRPO's clipped surrogate, the k3 KL, the external sampler's importance weights, and the loss
aggregations (the `loss` registry, chosen by update.loss_type), at TRL parity (docs/training.md, "GRPO conventions").

Shapes: B rows in a micro-batch, T completion tokens. Pure tensor functions; the optimisation loop that
calls them is rredcot/stages/update.py.
"""

from __future__ import annotations

from typing import Callable

import torch

from rredcot.registry import get, register

# ---- loss aggregations: per-token loss [B, T], mask [B, T] -> scalar --------------------------------
# Each entry declares `divide_by_accum`: whether the trainer divides it by the accumulation steps (all but dapo,
# whose denominator is the whole batch's active tokens).


@register("loss", "grpo")
def agg_grpo(loss: torch.Tensor, mask: torch.Tensor, **_: object) -> torch.Tensor:
    """Mean over rows of each row's token mean."""
    return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@register("loss", "bnpo")
def agg_bnpo(loss: torch.Tensor, mask: torch.Tensor, **_: object) -> torch.Tensor:
    """Token mean over the micro-batch."""
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


@register("loss", "dr_grpo")
def agg_dr_grpo(
    loss: torch.Tensor, mask: torch.Tensor, *, max_completion_length: int | None = None, **_: object
) -> torch.Tensor:
    """Sum over tokens / (B * max_completion_length): no length bias."""
    length = max_completion_length or loss.shape[1]
    return (loss * mask).sum() / (loss.shape[0] * length)


@register("loss", "dapo", divide_by_accum=False)
def agg_dapo(loss: torch.Tensor, mask: torch.Tensor, *, num_items: float | None = None, **_: object) -> torch.Tensor:
    """Sum over tokens / active tokens of the whole batch (num_items; default: this batch's)."""
    denom = float(mask.sum()) if num_items is None else float(num_items)
    return (loss * mask).sum() / max(denom, 1.0)


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


def sampler_correction(
    old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Truncated importance weights for tokens another engine sampled (vLLM), and the mismatch stats.

    w = min(exp(old_logp - sampler_logp), cap) per token [B, T] (None when cap == 0: no correction).
    Example: old -1.0, sampler -1.5: w = e^0.5 = 1.65; old -1.0, sampler -2.0, cap 2: min(e^1, 2) = 2.
    """
    m = mask.bool()
    diff = (old_logp - sampler_logp)[m]
    ratio = torch.exp(old_logp - sampler_logp)
    stats = {
        "sampler/logp_diff_mean": float(diff.abs().mean()) if diff.numel() else 0.0,
        "sampler/logp_diff_max": float(diff.abs().max()) if diff.numel() else 0.0,
        "sampler/is_ratio_mean": float(ratio[m].mean()) if diff.numel() else 1.0,
    }
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
    gradient-accumulation steps: the trainer does that for the types that declare `divide_by_accum`.
    """
    loss, _, _ = per_token_terms(
        logp, old_logp, advantages, eps_low=eps_low, eps_high=eps_high, beta=beta, ref_logp=ref_logp
    )
    agg: Callable[..., torch.Tensor] = get("loss", loss_type)
    return agg(loss, mask.to(loss.dtype), max_completion_length=max_completion_length, num_items=num_items)


def clip_stats(
    rho: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float
) -> dict[str, float]:
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
