"""Rank and linear correlation with the uncertainty the credit report states: a bootstrap interval over
traces (traces are the independent units; segments of one trace are not), and the split-half reliability
of a Monte Carlo reference (how well it agrees with itself: an estimator cannot agree with MC better)."""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank): [3, 1, 3] -> [2.5, 1, 2.5]."""
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for v in x.unique():
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation; NaN when fewer than 3 points or either side is constant."""
    a, b = a.double(), b.double()
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()).norm() * (b - b.mean()).norm()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(_ranks(a), _ranks(b)) if len(a) >= 3 else math.nan


def spearman_brown(r: float) -> float:
    """Reliability of the whole from the correlation of two halves: 2r / (1 + r). Example: r = .5 -> .667."""
    return 2 * r / (1 + r) if not math.isnan(r) and r > -1 else math.nan


def bootstrap_ci(units: Sequence, stat: Callable[[list], float], reps: int = 200, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of `stat` over `units` resampled with replacement (NaN draws left out)."""
    rng = random.Random(seed)
    draws = sorted(
        x for x in (stat([units[rng.randrange(len(units))] for _ in units]) for _ in range(reps)) if not math.isnan(x)
    )
    if len(draws) < 10:
        return math.nan, math.nan
    return draws[int(0.025 * (len(draws) - 1))], draws[int(math.ceil(0.975 * (len(draws) - 1)))]
