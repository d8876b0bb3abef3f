"""Advantages: GRPO's group advantages and group statistics, the one rule for groups whose rewards are
all equal, and the per-group accounting of where credit goes (as verl's core_algos). redistribute, update
and the metrics import these; nothing else computes a group statistic.

Shapes: N rows, G = group_size consecutive rows per prompt, T completion tokens. Undefined rewards are NaN:
they are left out of every group statistic and get advantage 0.

The equal-rewards rule (one for the logs and for training): a group carries no signal when its *defined*
rewards are all equal (within EQUAL_TOL); fewer than two defined rewards count as equal. Example, G=2:
[1, NaN] is equal (one defined reward: its GRPO advantages are [0, 0]), [NaN, NaN] is equal, [1, 0] is not.
"""

from __future__ import annotations

import torch

from rredcot import collectives
from rredcot.types import Verified

EQUAL_TOL = 1e-8  # rewards this close are one reward (continuous plug-in rewards): GRPO's advantage is ~0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: rewards [N] (G consecutive rows per prompt) -> [N].

    Example, G=2, rewards [1, 0, 1, 1]: group means [.5, 1]; Bessel stds [.7071, 0]
      scale="group": [.5/(.7071+1e-4), -.5/(.7071+1e-4), 0, 0] = [.7070, -.7070, 0, 0]
      scale="none":  [.5, -.5, 0, 0]          (Dr. GRPO)
      scale="batch": [.5, -.5, 0, 0] / (std([1,0,1,1]) = .5 + 1e-4)
    NaN rewards (undefined) are left out of the group statistics and get advantage 0.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be [N] with N a multiple of group_size={group_size}, got {tuple(rewards.shape)}"
        )
    r = rewards.view(-1, group_size).float()  # [N/G, G]
    valid = ~torch.isnan(r)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    mean, std = group_stats(r)
    adv = r0 - mean
    if scale == "group":
        adv = adv / (std + eps)
    elif scale == "batch":
        pooled = collectives.pooled(r[valid])  # the whole generation batch's rewards, every rank's
        adv = adv / (pooled.std() + eps) if pooled.numel() > 1 else adv / (1 + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")
    return torch.where(valid, adv, torch.zeros_like(adv)).view(-1)


def group_stats(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    return group_stats(rewards.view(-1, group_size).float())[1].expand(-1, group_size).reshape(-1)


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] bool: the row's group has one reward for every trace with a defined one (the rule above).
    Example: G=2, rewards [1, 1, 1, 0, nan, 0] -> [T, T, F, F, T, T]."""
    r = rewards.view(-1, group_size)
    hi = torch.nan_to_num(r, nan=-torch.inf).max(1).values
    lo = torch.nan_to_num(r, nan=torch.inf).min(1).values
    return ((hi - lo) < EQUAL_TOL).repeat_interleave(group_size)  # all NaN: -inf - inf < 0, equal


def frac_zero_std(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (zero GRPO advantage: no signal), by the rule above.
    Example: G=2, [1, 1, 0, 1] -> .5; [1, nan, 0, 1] -> .5 ([1, nan] carries no signal)."""
    return float(equal_reward_groups(rewards, group_size).view(-1, group_size)[:, 0].float().mean())


def group_mean(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] the mean reward of each row's group, undefined (NaN) rewards left out (0 if all are)."""
    means = torch.nanmean(rewards.view(-1, group_size), 1, keepdim=True)
    return torch.nan_to_num(means, nan=0.0).expand(-1, group_size).reshape(-1)


def credit_scale(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] the reward std (Bessel) of each row's group, undefined rewards left out; 1 where it is 0 (credit
    still carries signal in groups whose rewards are all equal, and dividing by eps would blow it up)."""
    std = group_std(rewards, group_size)
    return torch.where(std > 0, std, torch.ones_like(std))


def advantage_by_group(
    advantages: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor, group_size: int
) -> dict[str, float]:
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


def credit_stats(seg_r: list[torch.Tensor], values: list[torch.Tensor], ver: Verified) -> dict[str, float]:
    """Credit mean/std over segments (corrections excluded), sign agreement with the outcome, V_0."""
    inner = [r[:-1] for r in seg_r]
    pooled = torch.cat(inner) if inner else torch.zeros(0)
    right = [r for r, ok in zip(inner, ver.correct.tolist()) if ok]
    wrong = [r for r, ok in zip(inner, ver.correct.tolist()) if not ok]
    frac = lambda rs, sign: float((torch.cat(rs) * sign > 0).float().mean()) if rs and torch.cat(rs).numel() else 0.0  # noqa: E731
    return {
        "credit/mean": float(pooled.mean()) if pooled.numel() else 0.0,
        "credit/std": float(pooled.std()) if pooled.numel() > 1 else 0.0,
        "credit/frac_pos_in_wrong": frac(wrong, 1.0),
        "credit/frac_neg_in_right": frac(right, -1.0),
        "value/start_mean": float(torch.stack([v[0] for v in values]).mean()) if values else 0.0,
        "value/end_mean": float(torch.stack([v[-1] for v in values]).mean()) if values else 0.0,
        # traces whose thinking part gave no segment (e.g. empty): all their credit is the correction
        "credit/frac_traces_without_segments": sum(len(v) == 1 for v in values) / max(len(values), 1),
    }
