"""Per-token policy-gradient terms, at parity with TRL 1.16.0 (trl/trainer/grpo_trainer.py): the importance
ratio at token or sequence level (GSPO), the surrogates of the loss types (PPO's clip with optional two-sided
clipping, CISPO, SAPO, VESPO), DeepSeek-V3.2's off-policy sequence mask, the k3 KL (optionally weighted by
the ratio), and the importance weights for tokens another engine sampled (vLLM), in TRL's four modes.
How the per-token loss is aggregated (update.loss_type): rredcot/losses.py.

Shapes: B rows in a micro-batch, T completion tokens. Ratios are [B, T] at token level and [B, 1] at
sequence level; advantages are [B] (GRPO) or [B, T] (token credit), both broadcast against them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

SURROGATE_NAMES = ("clip", "cispo", "sapo", "vespo")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
IS_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class Surrogate:
    """The update.* options of the per-token terms (defaults: ours; TRL 1.16's in the comments)."""

    eps_low: float = 0.2  # TRL epsilon
    eps_high: float = 0.2  # TRL epsilon_high; cispo: the cap of the ratio itself (ScaleRL's eps_max)
    beta: float = 0.0
    level: str = "token"  # TRL importance_sampling_level
    delta: float | None = None  # two-sided clipping (INTELLECT-2): the ratio's cap where A < 0
    off_policy_mask_threshold: float | None = None
    use_bias_correction_kl: bool = False  # TRL's default is True (it changes the KL gradient only when beta > 0)
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    @classmethod
    def from_cfg(cls, cfg: Any) -> Surrogate:
        """From the update section (keys it lacks keep the defaults: a run saved before they existed).
        Example: {"eps_low": .2, "importance_sampling_level": "sequence"} -> Surrogate(level="sequence")."""
        get = cfg.get
        names = {"level": "importance_sampling_level"}
        fields = cls.__dataclass_fields__
        return cls(**{f: get(names.get(f, f), fields[f].default) for f in fields})


@dataclass
class Terms:
    """What every surrogate reads: log-probs [B, T] (with grad), their log ratio to the old policy [B, T], the
    importance ratio coef [B, T] or [B, 1], advantages [B, T] or [B, 1], the loss mask [B, T], and the
    sampler's importance weights [B, T] (vespo folds token-level ones into its own weight), or None."""

    logp: torch.Tensor
    log_ratio: torch.Tensor
    coef: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor
    is_weight: torch.Tensor | None


def importance_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """exp(log pi - log pi_old): per token [B, T], or per sequence [B, 1] from the masked mean of the log ratios
    (GSPO; TRL 1.16.0 grpo_trainer.py, _compute_loss, importance_sampling_level).
    Example: log ratios [.1, .3, 9] with mask [1, 1, 0]: sequence level exp(.2) = 1.2214 for the whole row."""
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        return torch.exp((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
    raise ValueError(f"importance_sampling_level must be one of {', '.join(IS_LEVELS)}, got {level!r}")


def clip_surrogate(t: Terms, o: Surrogate) -> torch.Tensor:
    """PPO's -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A); with delta, rho is first capped at delta in the
    unclipped term (two-sided clipping: a negative advantage with a huge ratio no longer gives an unbounded
    loss). Example: rho 3, A -1, delta 2: -min(-2, -1.2) = 2 (without delta: 3)."""
    clipped = torch.clamp(t.coef, 1 - o.eps_low, 1 + o.eps_high)
    coef = t.coef if o.delta is None else torch.clamp(t.coef, max=o.delta)
    return -torch.min(coef * t.adv, clipped * t.adv)


def cispo_surrogate(t: Terms, o: Surrogate) -> torch.Tensor:
    """CISPO (MiniMax-M1): -sg(min(rho, eps_high)) A log pi: the weight is clipped, never the gradient.
    Example: rho 6, eps_high 5, A 1, log pi -2: 5 * 2 = 10 (gradient -5 A per token)."""
    return -torch.clamp(t.coef, max=o.eps_high).detach() * t.adv * t.logp


def sapo_surrogate(t: Terms, o: Surrogate) -> torch.Tensor:
    """SAPO: a soft gate instead of the clip, -sigmoid(tau (rho - 1)) 4 / tau A, tau by the advantage's sign
    (A > 0: sapo_temperature_pos). At rho = 1 it is -2 A / tau and its slope in rho is A, as PPO's."""
    tau = torch.where(t.adv > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
    return -torch.sigmoid(tau * (t.coef - 1)) * 4 / tau * t.adv


@torch.no_grad()
def gamma_weights(t: Terms, o: Surrogate) -> torch.Tensor:
    """VESPO's phi(w) = e^lambda w^k e^(-lambda w) (phi(1) = 1), w the sequence's product of token ratios times
    the sampler's token weights, k and lambda by the advantage's sign; a coefficient only (no gradient).
    Copied from TRL 1.16.0 grpo_trainer.py, GRPOTrainer.get_gamma_weights (log space, its clamps).
    [B, 1] for advantages [B, 1]; [B, T] for token advantages (k and lambda per token's sign)."""
    lower = math.log(1e-8)
    seq_log = (torch.clamp(t.log_ratio, -20.0, 20.0) * t.mask).sum(-1, keepdim=True)  # a sum, not a mean
    if t.is_weight is not None:
        seq_log = seq_log + torch.clamp(torch.log(t.is_weight), lower, 20.0).sum(-1, keepdim=True)
    log_w = torch.clamp(seq_log, lower, 20.0)
    nonneg = t.adv >= 0
    k = torch.where(nonneg, o.vespo_k_pos, o.vespo_k_neg)
    lam = torch.where(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_surrogate(t: Terms, o: Surrogate) -> torch.Tensor:
    """VESPO: -phi(w) A log pi (gamma_weights): a smooth, asymmetric weight in place of clipping."""
    return -gamma_weights(t, o) * t.adv * t.logp


SURROGATES: dict[str, Callable[[Terms, Surrogate], torch.Tensor]] = {
    "clip": clip_surrogate,
    "cispo": cispo_surrogate,
    "sapo": sapo_surrogate,
    "vespo": vespo_surrogate,
}


def off_policy_mask(
    adv: torch.Tensor, logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, threshold: float
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL 1.16.0 grpo_trainer.py, GRPOTrainer.get_off_policy_mask):
    keep where A >= 0 or the sequence's mean KL(behaviour || pi) <= threshold; the behaviour policy is the
    sampler's (vLLM) or the old one. [B, 1] for advantages [B, 1]; [B, T] for token advantages (per token's sign).
    Example: A -1, log ratios behaviour - pi [.4, .8]: mean .6 > .5 -> dropped; A +1 -> kept."""
    kl = torch.nan_to_num(behaviour_logp - logp.detach(), nan=0.0)  # unscorable tokens: no KL evidence
    mean_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((adv >= 0) | (mean_kl <= threshold)).to(mask.dtype)


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
    mask: torch.Tensor | None = None,
    surrogate: str = "clip",
    options: Surrogate | None = None,
    sampler_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(per-token loss [B, T], ratio rho [B, T], k3 KL [B, T] or None). advantages [B] or [B, T].

    The order is TRL 1.16.0's (grpo_trainer.py, _compute_loss): surrogate, times the off-policy mask, times the
    sampler's importance weight (not vespo's: it is inside phi), plus beta k3 (times rho with
    use_bias_correction_kl). `options` carries every update.* option; eps_low/eps_high/beta apply without it.
    Example: logp = old_logp (rho = 1), A = 2: loss = -min(1 * 2, 1 * 2) = -2 per token.
    rho = 1.5, A = 1: -min(1.5, clip(1.5, .8, 1.2) = 1.2) = -1.2 (clipped); A = -1: -min(-1.5, -1.2) = 1.5.
    """
    if surrogate not in SURROGATES:  # a plug-in loss entry's `surrogate=` names one of these
        raise ValueError(f"surrogate must be one of {', '.join(SURROGATE_NAMES)}, got {surrogate!r}")
    o = options or Surrogate(eps_low=eps_low, eps_high=eps_high, beta=beta)
    m = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)
    adv = advantages if advantages.ndim == 2 else advantages[:, None]  # [B, T] or [B, 1]
    log_ratio = logp - old_logp
    coef = importance_ratio(log_ratio, m, o.level)
    terms = Terms(logp, log_ratio, coef, adv, m, is_weight)
    loss = SURROGATES[surrogate](terms, o)
    if o.off_policy_mask_threshold is not None:
        behaviour = old_logp if sampler_logp is None else sampler_logp
        loss = loss * off_policy_mask(adv, logp, behaviour, m, o.off_policy_mask_threshold)
    if is_weight is not None and surrogate != "vespo":
        loss = loss * is_weight
    kl = None
    if o.beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3 >= 0; e.g. d = .1 -> 1.10517 - .1 - 1 = .00517
        if o.use_bias_correction_kl:  # the unbiased reverse-KL gradient off-policy (DeepSeek-V3.2)
            kl = kl * coef
        loss = loss + o.beta * kl
    return loss.expand_as(logp), coef.expand_as(logp), kl


def sampler_correction(
    old_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
    mode: str = "token_truncate",
    cap_min: float = 0.0,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Importance weights for tokens another engine sampled (vLLM), and the mismatch stats.

    ratio = exp(old_logp - sampler_logp) per token [B, T] (token_*), or its product over the sequence [B, 1]
    (sequence_*); *_truncate clamps it to [cap_min, cap], *_mask sets it to 0 outside (TRL 1.16.0
    grpo_trainer.py, _generate_and_score_completions, vllm_importance_sampling_mode; cap = its clip_max,
    cap_min = its clip_min with 0 for None). None when cap == 0: measured, not corrected.
    Example: old -1.0, sampler -1.5: w = e^0.5 = 1.65; old -1.0, sampler -2.0, cap 2: min(e^1, 2) = 2;
    sequence_mask, cap 3: the row's ratio e^1.5 = 4.48 > 3 -> 0 on the whole row.
    """
    if mode not in IS_MODES:
        raise ValueError(f"update.is_mode must be one of {', '.join(IS_MODES)}, got {mode!r}")
    m = mask.bool()
    diff = torch.nan_to_num((old_logp - sampler_logp) * mask, nan=0.0)  # a token the sampler could not score: 1
    seq = mode.startswith("sequence")
    ratio = torch.exp(diff.sum(-1, keepdim=True) if seq else diff)
    counted = ratio[m.any(-1)] if seq else ratio[m]  # the rows, or the tokens, in the loss
    stats = {
        "sampler/logp_diff_mean": float(diff[m].abs().mean()) if m.any() else 0.0,
        "sampler/logp_diff_max": float(diff[m].abs().max()) if m.any() else 0.0,
        "sampler/is_ratio_mean": float(counted.mean()) if counted.numel() else 1.0,
    }
    if cap <= 0:
        return None, stats
    outside = (counted > cap) | (counted < cap_min)
    stats["sampler/is_capped_frac"] = float(outside.float().mean()) if counted.numel() else 0.0
    if mode.endswith("truncate"):
        return ratio.clamp(min=cap_min, max=cap), stats
    return ratio.masked_fill((ratio > cap) | (ratio < cap_min), 0.0), stats
