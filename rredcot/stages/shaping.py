"""Reward shaping after verification, on training rewards only (held-out accuracy never sees it): DAPO's soft
overlong punishment (arXiv 2503.14476, eq. 13; verl's reward_model.overlong_buffer). Its companion, DAPO's
overlong filtering (truncated completions out of the loss), is update.mask_truncated_completions.

Shapes: N completions.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rredcot.types import Rollout, Verified

NAME = "overlong"  # its metrics name (reward/overlong/mean); no reward function may take it (verify.py)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """[N] lengths (completion tokens, EOS included, as verl's response length) -> [N] rewards to add, <= 0:
    -penalty * max(0, length - (max_new_tokens - buffer)) / buffer; all 0 when buffer == 0.

    Example: max_new_tokens 100, buffer 20, penalty 1: length 80 -> 0, 90 -> -.5, 100 (truncated) -> -1.
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    over = (lengths.float().cpu() - (max_new_tokens - buffer)).clamp(min=0)
    return -penalty * over / buffer


def shape_overlong(ro: Rollout, ver: Verified, max_new_tokens: int, buffer: int, penalty: float) -> Verified:
    """`ver` with the overlong penalty added to each reward (undefined ones stay undefined) and kept as the
    reward function `overlong` for the logs; `ver` itself when the shaping is off."""
    if buffer <= 0:
        return ver
    pen = overlong_penalty(ro.lengths, max_new_tokens, buffer, penalty)
    rewards = ver.rewards + pen.to(ver.rewards.dtype)  # NaN + x = NaN: an undefined reward stays undefined
    return replace(ver, rewards=rewards, per_func={**ver.per_func, NAME: pen})
