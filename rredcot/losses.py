"""Losses: the loss types (the `loss` registry, chosen by update.loss_type), each a per-token surrogate and an
aggregation, at TRL parity (TRL 1.16.0 trl/trainer/grpo_trainer.py, _compute_loss; docs/training.md, "GRPO
conventions"). The per-token terms (ratios, surrogates, the KL, the sampler's importance weights):
rredcot/surrogates.py, re-exported here.

Shapes: B rows in a micro-batch, T completion tokens. Pure tensor functions; the optimisation loop that
calls them is rredcot/stages/update.py.
"""

from __future__ import annotations

import torch

from rredcot.registry import entry, register
from rredcot.surrogates import Surrogate, per_token_terms
from rredcot.surrogates import sampler_correction as sampler_correction  # re-exported: its callers import it here

# ---- loss aggregations: per-token loss [B, T], mask [B, T] -> scalar --------------------------------
# Each entry declares `divide_by_accum`: whether the trainer divides it by the accumulation steps (all but
# those whose denominator is the whole batch's active tokens: dapo, cispo, vespo), and `surrogate`: the
# per-token term it aggregates (surrogates.SURROGATES; PPO's clip unless named). TRL 1.16.0 pairs them so.


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


@register("loss", "luspo")
def agg_luspo(loss: torch.Tensor, mask: torch.Tensor, **_: object) -> torch.Tensor:
    """LUSPO: mean over rows of each row's token *sum* (a sequence-level loss scaled by its length; meant for
    update.importance_sampling_level=sequence, where every token of a row carries the same loss)."""
    return (loss * mask).sum(-1).mean()


# The other loss types of TRL 1.16.0 reuse an aggregation with their own surrogate: sapo is grpo's row mean,
# cispo and vespo dapo's whole-batch token mean.
register("loss", "sapo", surrogate="sapo")(agg_grpo)
register("loss", "cispo", divide_by_accum=False, surrogate="cispo")(agg_dapo)
register("loss", "vespo", divide_by_accum=False, surrogate="vespo")(agg_dapo)


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
    options: Surrogate | None = None,
) -> torch.Tensor:
    """The `loss_type`'s surrogate (+ beta * k3 KL), aggregated by its entry. Returns a scalar.

    logp, old_logp, ref_logp, mask: [B, T]; advantages: [B] or [B, T]. `options` (surrogates.Surrogate)
    replaces eps_low/eps_high/beta when given. Not divided by the gradient-accumulation steps: the trainer
    does that for the types that declare `divide_by_accum`.
    """
    e = entry("loss", loss_type, "update.loss_type")
    loss, _, _ = per_token_terms(
        logp,
        old_logp,
        advantages,
        eps_low=eps_low,
        eps_high=eps_high,
        beta=beta,
        ref_logp=ref_logp,
        mask=mask,
        surrogate=e.surrogate,
        options=options,
    )
    return e.obj(loss, mask.to(loss.dtype), max_completion_length=max_completion_length, num_items=num_items)


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


def surrogate_stats(
    surrogate: str, rho: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, o: Surrogate
) -> dict[str, float]:
    """What TRL 1.16.0 logs per surrogate (_compute_loss): the clip ratios for PPO's clip, cispo_clip_ratio
    (rho > eps_high with A > 0) for cispo, none for the soft ones (sapo, vespo)."""
    if surrogate == "clip":
        return clip_stats(rho, advantages, mask, o.eps_low, o.eps_high)
    if surrogate == "cispo":
        adv = advantages if advantages.ndim == 2 else advantages[:, None]
        hit, m = (rho > o.eps_high) & (adv > 0), mask.bool()
        return {"cispo_clip_ratio": float((hit & m).sum()) / max(float(m.sum()), 1.0)}
    return {}
