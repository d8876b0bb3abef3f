"""The credit report's statistics: ranks with ties, Spearman-Brown, and a bootstrap interval that
covers the statistic and narrows with more units."""

import math

import pytest
import torch

from rredcot.correlation import _ranks, bootstrap_ci, pearson, spearman, spearman_brown


def test_ranks_share_ties_and_spearman_reads_monotone_as_one():
    assert _ranks(torch.tensor([3.0, 1.0, 3.0])).tolist() == [2.5, 1.0, 2.5]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x**3) == pytest.approx(1.0) and pearson(x, x**3) < 1.0
    assert math.isnan(pearson(x, torch.ones(4)))  # a constant side has no correlation


def test_spearman_brown_example():
    # halves correlating .5 -> the whole is 2 * .5 / 1.5 = .667 reliable
    assert spearman_brown(0.5) == pytest.approx(2 / 3) and spearman_brown(1.0) == 1.0


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_units():
    g = torch.Generator().manual_seed(0)
    small = torch.randn(20, generator=g).tolist()
    large = torch.randn(400, generator=g).tolist()
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lo_s, hi_s = bootstrap_ci(small, mean)
    lo_l, hi_l = bootstrap_ci(large, mean)
    assert lo_s < mean(small) < hi_s and lo_l < mean(large) < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2  # 20x the units: ~4.5x narrower
