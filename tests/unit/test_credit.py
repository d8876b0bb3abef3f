"""Credit assignment: segment rewards, return-equivalence, modes and scaling on hand-sized tensors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rredcot.advantages import group_advantages
from rredcot.stages.redistribute import uniform
from rredcot.stages.token_credit import _weighted, segment_rewards, value_credit
from rredcot.types import Rollout, Sample, Segmented, Verified


def test_segment_rewards_example():
    # V = [.2, .5, .4], R = 1 -> r = [.5 - .2, .4 - .5, 1 - .4] = [.3, -.1, .6]
    r = segment_rewards(torch.tensor([0.2, 0.5, 0.4]), 1.0)
    assert torch.allclose(r, torch.tensor([0.3, -0.1, 0.6]))


@given(st.lists(st.floats(0, 1), min_size=1, max_size=12), st.sampled_from([0.0, 1.0]))
def test_return_equivalence(values, reward):
    # the credits always sum to R - V_0, whatever the values
    v = torch.tensor(values, dtype=torch.float64)
    assert segment_rewards(v, reward).sum().item() == pytest.approx(reward - values[0], abs=1e-9)


def _batch(rewards, lengths, bounds, T=8):
    """A fake rollout of N rows: completion i has lengths[i] tokens; groups of 2."""
    N = len(rewards)
    mask = torch.zeros(N, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ro = Rollout(
        torch.ones(N, 2, dtype=torch.long),
        torch.ones(N, 2, dtype=torch.long),
        torch.ones(N, T, dtype=torch.long),
        mask,
        torch.zeros(N, T),
        torch.zeros(N, T),
        torch.zeros(N, dtype=torch.bool),
        [""] * N,
        [Sample("p", "1")] * N,
        2,
    )
    r = torch.tensor(rewards)
    ver = Verified(r, {"accuracy": r}, r == 1, ["x"] * N)
    return ro, ver, Segmented(bounds, [None] * N)


# Two traces of one group: R = [1, 0]; each has 6 tokens, segments [0, 2), [2, 4) and the correction [4, 6).
RO, VER, SEG = _batch([1.0, 0.0], [6, 6], [[0, 2, 4], [0, 2, 4]])
VALUES = [torch.tensor([0.2, 0.6, 0.9]), torch.tensor([0.2, 0.1, 0.0])]


def test_immediate_mode_unscaled():
    # trace 0: r = [.4, .3] and correction 1 - .9 = .1; trace 1: r = [-.1, -.1], correction 0 - 0 = 0
    c = value_credit(RO, VER, SEG, VALUES, group_size=2, mode="immediate", scale="none")
    assert torch.allclose(c.advantages[0, :6], torch.tensor([0.4, 0.4, 0.3, 0.3, 0.1, 0.1]))
    assert torch.allclose(c.advantages[1, :6], torch.tensor([-0.1, -0.1, -0.1, -0.1, 0.0, 0.0]))
    assert torch.all(c.advantages[:, 6:] == 0)  # padding


def test_return_to_go_mode_group_scaled():
    # segment k gets R - V_(k-1): trace 0 [.8, .4, .1]; trace 1 [-.2, -.1, 0]; group reward std (Bessel) of
    # [1, 0] is .70711, so everything is divided by .70711 + 1e-4
    c = value_credit(RO, VER, SEG, VALUES, group_size=2, mode="return_to_go", scale="group")
    s = math.sqrt(0.5) + 1e-4
    assert torch.allclose(c.advantages[0, :6], torch.tensor([0.8, 0.8, 0.4, 0.4, 0.1, 0.1]) / s, atol=1e-6)
    assert torch.allclose(c.advantages[1, :6], torch.tensor([-0.2, -0.2, -0.1, -0.1, 0.0, 0.0]) / s, atol=1e-6)


def test_group_scale_is_one_when_the_group_is_all_equal():
    # R = [0, 0]: GRPO has no signal here, credit still does: unscaled (divided by 1 + eps, not eps)
    ro, ver, seg = _batch([0.0, 0.0], [4, 4], [[0, 2], [0, 2]])
    c = value_credit(
        ro,
        ver,
        seg,
        [torch.tensor([0.3, 0.1]), torch.tensor([0.3, 0.5])],
        group_size=2,
        mode="immediate",
        scale="group",
    )
    assert torch.allclose(c.advantages[0, :4], torch.tensor([-0.2, -0.2, -0.1, -0.1]) / (1 + 1e-4))


def test_equal_groups_zero_gives_all_right_and_all_wrong_groups_no_credit():
    # G=2: group 0 both right (return_to_go would give 1 - V = .7 / .9 on every token), group 1 mixed
    # (kept as is, so it equals the keep run there)
    from rredcot.advantages import equal_reward_groups

    ro, ver, seg = _batch([1.0, 1.0, 1.0, 0.0], [4, 4, 4, 4], [[0, 2]] * 4)
    values = [torch.tensor([0.3, 0.1])] * 4
    keep = value_credit(ro, ver, seg, values, group_size=2, mode="return_to_go", equal_groups="keep")
    zero = value_credit(ro, ver, seg, values, group_size=2, mode="return_to_go", equal_groups="zero")
    assert torch.allclose(keep.advantages[0, :4], torch.tensor([0.7, 0.7, 0.9, 0.9]) / (1 + 1e-4))
    assert (zero.advantages[:2] == 0).all() and torch.equal(zero.advantages[2:], keep.advantages[2:])
    assert equal_reward_groups(torch.tensor([1.0, 1.0, 1.0, 0.0, math.nan, 0.0]), 2).tolist() == [
        True,
        True,
        False,
        False,
        True,
        True,
    ]


def test_mixed_mode_adds_unit_std_credit_to_grpo():
    c = value_credit(RO, VER, SEG, VALUES, group_size=2, mode="mixed", alpha=0.5)
    A = group_advantages(VER.rewards, 2)
    r = torch.cat([segment_rewards(v, VER.rewards[i]) for i, v in enumerate(VALUES)])  # 6 credits
    expect0 = A[0] + 0.5 * torch.tensor([0.4, 0.3, 0.1]) / r.std()
    assert torch.allclose(c.advantages[0, [0, 2, 4]], expect0, atol=1e-6)


def test_anchored_mode_blends_the_group_mean_into_the_baseline():
    # m = mean([1, 0]) = .5; B = V + (1 - V) * .5: trace 0 B = [.6, .8, .95] -> R - B = [.4, .2, .05];
    # trace 1 B = [.6, .55, .5] -> [-.6, -.55, -.5]; unscaled
    c = value_credit(RO, VER, SEG, VALUES, group_size=2, mode="anchored", scale="none")
    assert torch.allclose(c.advantages[0, :6], torch.tensor([0.4, 0.4, 0.2, 0.2, 0.05, 0.05]), atol=1e-6)
    assert torch.allclose(c.advantages[1, :6], torch.tensor([-0.6, -0.6, -0.55, -0.55, -0.5, -0.5]), atol=1e-6)


def test_anchored_mode_with_zero_values_is_grpo():
    # no information in the values: B_k = m for every k, the GRPO advantage on every token
    ro, ver, seg = _batch([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], [4] * 6, [[0, 2]] * 6)
    c = value_credit(ro, ver, seg, [torch.zeros(2)] * 6, group_size=3, mode="anchored", scale="group")
    grpo = uniform(ro, ver, seg, group_size=3)
    assert torch.allclose(c.advantages, grpo.advantages.float(), atol=1e-4)


def test_credit_stats_signs():
    c = value_credit(RO, VER, SEG, VALUES, group_size=2, mode="immediate", scale="none")
    # right trace: credits [.4, .3] -> no negative; wrong trace: [-.1, -.1] -> no positive
    assert c.stats["credit/frac_neg_in_right"] == 0.0 and c.stats["credit/frac_pos_in_wrong"] == 0.0
    assert c.stats["value/start_mean"] == pytest.approx(0.2)


def test_undefined_reward_rows_are_skipped():
    ro, ver, seg = _batch([1.0, float("nan")], [4, 4], [[0, 2], [0, 2]])
    c = value_credit(ro, ver, seg, [torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])], group_size=2)
    assert c.valid.tolist() == [True, False] and torch.all(c.advantages[1] == 0)


def test_uniform_is_grpo():
    c = uniform(RO, VER, SEG, None, group_size=2)
    A = group_advantages(VER.rewards, 2)
    assert torch.allclose(c.advantages[:, :6], A[:, None].expand(2, 6))


def test_uniform_weights_give_grpo_back():
    # segment k gets A * K * w_k: with w = [.5, .5], K = 2 -> A on every token
    c = _weighted(RO, VER, SEG, [torch.tensor([0.5, 0.5])] * 2, 2, "group")
    assert torch.allclose(c.advantages, uniform(RO, VER, SEG, None, group_size=2).advantages.float())


def test_weights_move_advantage_between_segments():
    # w = [.75, .25], A_0 = .70701: segment 1 gets A * 2 * .75 = 1.5 A, segment 2 gets .5 A, answer A
    c = _weighted(RO, VER, SEG, [torch.tensor([0.75, 0.25])] * 2, 2, "group")
    A0 = group_advantages(VER.rewards, 2)[0]
    assert torch.allclose(c.advantages[0, :6], A0 * torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0, 1.0]))


def test_a_trace_without_end_of_thinking_gets_its_correction_on_its_last_segment():
    """No marker (truncated, or a model that answers without <think>): before the fix the correction
    R - V_K fell on an empty token range after the trace, so with mode=immediate a right and a wrong
    trace with equal values got identical advantages."""
    from rredcot.stages.segment import Trace, segment_fixed, without_answer_part
    from rredcot.stages.token_credit import value_credit
    from rredcot.types import Rollout, Segmented, Verified

    trace = Trace(list(range(6)), [0.0] * 6, think_end=None)
    bounds = without_answer_part(segment_fixed(trace, size=3), trace)
    assert segment_fixed(trace, size=3) == [0, 3, 6] and bounds == [0, 3]  # the completion's end is not a boundary
    N, T = 2, 6
    ro = Rollout(
        prompt_ids=torch.ones(N, 1, dtype=torch.long),
        prompt_mask=torch.ones(N, 1, dtype=torch.long),
        completion_ids=torch.ones(N, T, dtype=torch.long),
        completion_mask=torch.ones(N, T, dtype=torch.long),
        logprobs=torch.zeros(N, T),
        entropies=torch.zeros(N, T),
        truncated=torch.ones(N, dtype=torch.bool),
        texts=["", ""],
        samples=[None, None],
        group_size=2,
    )
    ver = Verified(
        rewards=torch.tensor([1.0, 0.0]), per_func={}, correct=torch.tensor([True, False]), extractor=["", ""]
    )
    seg = Segmented(boundaries=[bounds, bounds], think_end=[None, None])
    values = [torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])]  # V at b_0 = 0 and b_1 = 3
    credit = value_credit(ro, ver, seg, values, group_size=2, mode="immediate", scale="none")
    # segment [0, 3): V_1 - V_0 = 0 for both; last segment [3, 6): the correction R - V_1 = +.5 / -.5
    assert credit.advantages[0].tolist() == [0, 0, 0, 0.5, 0.5, 0.5]
    assert credit.advantages[1].tolist() == [0, 0, 0, -0.5, -0.5, -0.5]


def test_group_std_leaves_undefined_rewards_out():
    from rredcot.advantages import credit_scale as _group_std

    # group [1, 0, nan]: std of [1, 0] = .7071 (counting NaN as 0 gave std([1, 0, 0]) = .5774)
    got = _group_std(torch.tensor([1.0, 0.0, float("nan"), 1.0, 1.0, 1.0]), 3)
    assert got[:3].tolist() == pytest.approx([0.7071] * 3, abs=1e-4) and got[3:].tolist() == [1.0] * 3
