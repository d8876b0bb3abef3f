"""Redistribute stage: turn the verified reward into [N, T] token advantages.

Every entry has the signature (rollout, verified, segmented, *, group_size, scale_rewards, **options)
-> Credit. `uniform` gives every token its trace's GRPO advantage: it *is* GRPO.
"""
from __future__ import annotations

import torch

from rredcot.registry import register
from rredcot.stages.update import group_advantages
from rredcot.types import Credit, Rollout, Segmented, Verified


@register("redistribute", "uniform")
def uniform(
    rollout: Rollout, verified: Verified, segmented: Segmented, *, group_size: int, scale_rewards: str = "group"
) -> Credit:
    """GRPO: A_i on every token of completion i. advantages [N, T] = A [N, 1] * mask [N, T]."""
    adv = group_advantages(verified.rewards, group_size, scale=scale_rewards)  # [N]
    valid = ~torch.isnan(verified.rewards)
    return Credit(advantages=adv[:, None] * rollout.completion_mask, valid=valid)
