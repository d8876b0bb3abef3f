"""mode=reweight: GRPO's advantage re-weighted inside each trace by sigma (issue 20), on hand-sized tensors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rredcot.stages.redistribute import uniform
from rredcot.stages.token_credit import reweight_sigma, segment_tokens, value_credit

from .test_credit import _batch

# Two groups of 2: rewards [1, 0 | 1, NaN]; 6 tokens each: segments [0, 2), [2, 4), then 2 tokens after b_K.
RO, VER, SEG = _batch([1.0, 0.0, 1.0, math.nan], [6, 6, 6, 5], [[0, 2, 4]] * 4)


@pytest.mark.parametrize("how", ["softmax", "positive", "signed"])
@pytest.mark.parametrize("v", [0.0, 0.3, 1.0])
def test_values_with_no_information_give_grpo_bit_for_bit(how, v):
    # constant V: every r_k = 0 (only the correction differs), so sigma = 1 and the advantages are GRPO's exactly
    values = [torch.full((3,), v) for _ in range(4)]
    got = value_credit(RO, VER, SEG, values, group_size=2, mode="reweight", sigma=how, sigma_floor=0.2)
    want = uniform(RO, VER, SEG, group_size=2)
    assert torch.equal(got.advantages, want.advantages)
    assert got.stats["credit/sigma_max"] == got.stats["credit/sigma_min"] == 1.0


def test_positive_sigma_example_from_the_docstring():
    # r = [.3, -.1, .6 (correction)], 2 + 2 thinking tokens, 2 after b_K, A > 0: s = [.3, -.1], neutral .1,
    # u = [.3, 0, .1], sum u_j n_j = .6 + 0 + .2 = .8 over L = 6 tokens -> sigma = u * 6 / .8 = [2.25, 0, .75]
    sigma = reweight_sigma(torch.tensor([0.3, -0.1, 0.6]), 1.0, [0, 2, 4], 6, how="positive")
    assert sigma.tolist() == pytest.approx([2.25, 0.0, 0.75])
    # a wrong trace (A < 0) weights the segment that lowered V: s = [-.3, .1], neutral -.1, u = [0, .1, 0]
    sigma = reweight_sigma(torch.tensor([0.3, -0.1, 0.6]), -1.0, [0, 2, 4], 6, how="positive")
    assert sigma.tolist() == pytest.approx([0.0, 3.0, 0.0])
    # floor .25: .25 + .75 * [2.25, 0, .75] = [1.9375, .25, .8125]
    sigma = reweight_sigma(torch.tensor([0.3, -0.1, 0.6]), 1.0, [0, 2, 4], 6, how="positive", floor=0.25)
    assert sigma.tolist() == pytest.approx([1.9375, 0.25, 0.8125])


def test_the_trace_keeps_grpos_sign_and_total_weight():
    values = [
        torch.tensor([0.2, 0.6, 0.9]),
        torch.tensor([0.2, 0.1, 0.0]),
        torch.tensor([0.1, 0.1, 0.8]),
        torch.tensor([0.5, 0.4, 0.3]),
    ]
    got = value_credit(RO, VER, SEG, values, group_size=2, mode="reweight", sigma="softmax", tau=0.1)
    grpo = uniform(RO, VER, SEG, group_size=2).advantages
    for i in range(4):
        n = int(RO.completion_mask[i].sum())
        assert got.advantages[i, :n].sum().item() == pytest.approx(grpo[i, :n].sum().item(), abs=1e-5)
        assert (got.advantages[i] * grpo[i] >= 0).all()  # never the opposite sign (softmax sigma >= 0)
    # trace 0 is right and its first segment raised V most (r = .4, then .3); the NaN row gets nothing
    assert got.advantages[0, 0] > got.advantages[0, 2] > 0
    assert (got.advantages[3] == 0).all()


@given(
    st.lists(st.floats(-1, 1), min_size=2, max_size=8),
    st.sampled_from([1.0, -0.5]),
    st.sampled_from(["softmax", "positive", "signed"]),
    st.floats(0, 1),
)
def test_sigma_has_mean_one_over_the_traces_tokens(credits, advantage, how, floor):
    K = len(credits) - 1
    bounds = [2 * k for k in range(K + 1)]  # K segments of 2 tokens, then 3 tokens after b_K
    sigma = reweight_sigma(torch.tensor(credits), advantage, bounds, 2 * K + 3, how=how, floor=floor)
    n = segment_tokens(bounds, 2 * K + 3)
    assert (sigma * n).sum().item() == pytest.approx(float(n.sum()), rel=1e-4)
    if how != "signed":
        assert sigma.min().item() >= floor - 1e-6
