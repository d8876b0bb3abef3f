"""From segment values (or segment weights) to [N, T] token advantages: the modes of the value estimators
(`value_credit`) and the GRPO advantage spread by attribution weights (`_weighted`). See stages/redistribute.py
for the modes' definitions and why `anchored` is the default.

Shapes: N traces, T completion tokens, K segments per trace (boundaries b_0 = 0 < ... < b_K).
"""

from __future__ import annotations

import torch

from rredcot import collectives
from rredcot.advantages import credit_scale, credit_stats, equal_reward_groups, group_advantages, group_mean
from rredcot.types import Credit, Rollout, Segmented, Verified


def segment_rewards(values: torch.Tensor, reward: float | torch.Tensor) -> torch.Tensor:
    """values [K+1] = V_hat at b_0..b_K -> [K+1]: r_1..r_K, then the correction r_(K+1) = R - V_K.

    They sum to R - V_0 (return-equivalence). Example: V = [.2, .5, .4], R = 1 -> [.3, -.1, .6].
    """
    return torch.cat([values[1:] - values[:-1], torch.as_tensor(reward, dtype=values.dtype).view(1) - values[-1:]])


def _spread(per_segment: torch.Tensor, bounds: list[int], length: int, T: int) -> torch.Tensor:
    """[K+1] values (segments, then the correction) -> [T] per token; 0 on padding."""
    out = torch.zeros(T)
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        out[a:b] = per_segment[k]
    out[bounds[-1] : length] = per_segment[-1]
    return out


def value_credit(
    ro: Rollout,
    ver: Verified,
    seg: Segmented,
    values: list[torch.Tensor],
    *,
    group_size: int,
    mode: str = "return_to_go",
    scale: str = "group",
    alpha: float = 1.0,
    scale_rewards: str = "group",
    equal_groups: str = "keep",
    eps: float = 1e-4,
) -> Credit:
    """Token advantages [N, T] from boundary values, by `mode` and `scale`, plus the credit statistics.

    equal_groups="zero": groups whose traces all got the same reward get no credit, as in GRPO (with
    return_to_go an all-right group otherwise gets 1 - V ~ 1 on every token: a push with no baseline)."""
    N, T = ro.completion_ids.shape
    valid = ~torch.isnan(ver.rewards)
    R = torch.nan_to_num(ver.rewards, nan=0.0)
    lengths = ro.lengths.tolist()
    seg_r = [segment_rewards(v, R[i]) for i, v in enumerate(values)]  # per trace [K+1]
    if mode == "immediate":
        per_seg = seg_r
    elif mode == "return_to_go":
        per_seg = [R[i] - v for i, v in enumerate(values)]  # segment k: R - V_(k-1); correction: R - V_K
    elif mode == "anchored":
        m = group_mean(ver.rewards, group_size)
        per_seg = [R[i] - (v.clamp(0, 1) + (1 - v.clamp(0, 1)) * m[i]) for i, v in enumerate(values)]
    else:
        grpo = group_advantages(ver.rewards, group_size, scale=scale_rewards)
        pooled = collectives.pooled(torch.cat(seg_r))  # every rank's segments: one unit for the whole batch
        unit = pooled.std() if pooled.numel() > 1 and pooled.std() > 0 else torch.tensor(1.0)
        per_seg = [grpo[i] + alpha * r / unit for i, r in enumerate(seg_r)]
    adv = torch.stack([_spread(p, seg.boundaries[i], lengths[i], T) for i, p in enumerate(per_seg)])  # [N, T]
    if mode != "mixed":
        if scale == "group":
            adv = adv / (credit_scale(ver.rewards, group_size)[:, None] + eps)
        elif scale == "batch":
            pooled = collectives.pooled(torch.cat(per_seg))
            adv = adv / (pooled.std() + eps if pooled.numel() > 1 else 1.0)
    if equal_groups == "zero":
        adv = adv * (~equal_reward_groups(ver.rewards, group_size))[:, None]
    adv = adv * ro.completion_mask.cpu() * valid[:, None]
    return Credit(
        advantages=adv.to(ro.completion_ids.device),
        valid=valid,
        stats=credit_stats(seg_r, values, ver),
        segment_credit=seg_r,
        values=values,
    )


def _weighted(ro, ver, seg, weights: list[torch.Tensor], group_size: int, scale_rewards: str) -> Credit:
    """GRPO advantage A_i spread by segment weights w (sum 1): segment k gets A_i * K * w_k (uniform w
    gives GRPO back); the tokens after b_K get A_i."""
    A = group_advantages(ver.rewards, group_size, scale=scale_rewards)
    N, T = ro.completion_ids.shape
    lengths = ro.lengths.tolist()
    per_seg = [torch.cat([A[i] * len(w) * w, A[i].view(1)]) if len(w) else A[i].view(1) for i, w in enumerate(weights)]
    adv = (
        torch.stack([_spread(p, seg.boundaries[i], lengths[i], T) for i, p in enumerate(per_seg)])
        * ro.completion_mask.cpu()
    )
    return Credit(advantages=adv.to(ro.completion_ids.device), valid=~torch.isnan(ver.rewards), segment_credit=per_seg)
