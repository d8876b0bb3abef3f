"""One rule for groups whose rewards are all equal: the logs (metrics) and the training (redistribute) agree."""

import math

import torch

from rredcot.advantages import equal_reward_groups, frac_zero_std, group_advantages

NAN = math.nan


def test_a_group_with_one_defined_reward_carries_no_signal_in_the_logs_and_in_training():
    # G=2: [1, NaN] has one defined reward, so GRPO gives it advantages [0, 0]: no signal. The metric
    # frac_reward_zero_std and redistribute's equal_groups must both count it as equal (they used to disagree).
    rewards = torch.tensor([1.0, NAN, 1.0, 0.0])
    assert group_advantages(rewards, 2)[:2].tolist() == [0.0, 0.0]
    assert equal_reward_groups(rewards, 2).tolist() == [True, True, False, False]
    assert frac_zero_std(rewards, 2) == 0.5


def test_all_undefined_and_all_equal_groups_are_equal_and_mixed_groups_are_not():
    # groups: [NaN, NaN] equal, [0, 0] equal, [1, 1] equal, [0, 1] not: 3 of 4
    rewards = torch.tensor([NAN, NAN, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    assert equal_reward_groups(rewards, 2).view(-1, 2)[:, 0].tolist() == [True, True, True, False]
    assert frac_zero_std(rewards, 2) == 0.75


def test_the_metric_counts_exactly_the_groups_whose_grpo_advantages_are_all_zero():
    # property over many random groups with undefined rewards mixed in
    gen = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (600,), generator=gen).float()
    r[torch.rand(600, generator=gen) < 0.3] = NAN
    zero = (group_advantages(r, 3).view(-1, 3) == 0).all(1)
    assert equal_reward_groups(r, 3).view(-1, 3)[:, 0].tolist() == zero.tolist()
    assert frac_zero_std(r, 3) == float(zero.float().mean())
