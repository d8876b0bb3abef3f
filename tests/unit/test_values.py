"""Value estimators on a tiny real model: forced-answer values and Monte Carlo values."""

import pytest
import torch

from rredcot.errors import UserError
from rredcot.stages.context import PolicyContext, group_answers
from rredcot.stages.montecarlo import anchor_indices, blend_anchors, mc_values
from rredcot.stages.rollout import sample_rollout
from rredcot.stages.segment import PieceDecoder, run_segment, segment_newline
from rredcot.stages.values import forced_values, verdict_values
from rredcot.stages.verify import BuiltinVerifier, GSM8KVerifier, RewardFuncs, run_verify
from rredcot.types import Sample


@pytest.fixture
def batch(tiny_model):
    model, tok = tiny_model
    torch.manual_seed(0)
    samples = [Sample("a=3, b=a+4. b=?\n", "7"), Sample("x=2, y=x*3. y=?\n", "6")]
    ro = sample_rollout(model, tok, samples, group_size=2, max_new_tokens=16)
    # Give the rollout known texts' answers: the extractor reads ro.texts
    ro.texts = ["<think>\nb=3+4=7\n</think>\n7", "<think>\nb=3+4=8\n</think>\n8", "</think>\n5", "no answer"]
    ver = run_verify(ro.texts, ro.samples, RewardFuncs(BuiltinVerifier()))
    seg = run_segment(ro, segment_newline, PieceDecoder(tok))
    ctx = PolicyContext(model, tok, BuiltinVerifier(), "</think>\n", "</s>")
    return ro, ver, seg, ctx


def test_group_answers(batch):
    ro, _, _, ctx = batch
    assert group_answers(ro, ctx, 0, 2, include_reference=True) == ["7", "8"]
    assert group_answers(ro, ctx, 2, 2, include_reference=False) == ["5"]
    assert group_answers(ro, ctx, 2, 2, include_reference=True) == ["5", "6"]


def test_forced_values_are_probabilities_of_right_answers(batch):
    ro, ver, seg, ctx = batch
    values, stats = forced_values(ro, ver, seg, ctx, group_size=2)
    for v, b in zip(values, seg.boundaries):
        assert v.shape == (len(b),) and torch.all((v >= 0) & (v <= 1))
    assert stats["credit/probe_tokens_per_trace"] > 0


def test_no_right_answer_in_the_group_means_zero_values(batch):
    ro, ver, seg, ctx = batch
    values, _ = forced_values(ro, ver, seg, ctx, group_size=2, include_reference=False)
    assert torch.all(values[2] == 0) and torch.all(values[3] == 0)  # group 2 answered only "5" (wrong)
    assert torch.all(values[0] > 0)  # group 1 has the right "7"


def test_self_normalised_values_are_shares(batch):
    ro, ver, seg, ctx = batch
    plain, _ = forced_values(ro, ver, seg, ctx, group_size=2)
    norm, _ = forced_values(ro, ver, seg, ctx, group_size=2, self_normalize=True)
    # group 1 scores "7" (right) and "8": the share of "7" is at least its raw probability
    assert torch.all(norm[0] >= plain[0] - 1e-6) and torch.all(norm[0] <= 1 + 1e-6)


def test_missing_forcing_text_is_a_clear_error(batch):
    ro, ver, seg, ctx = batch
    ctx.force_text = None
    with pytest.raises(UserError, match="task.forcing_text"):
        forced_values(ro, ver, seg, ctx, group_size=2)


def test_mc_values_are_mean_rewards_of_continuations(batch):
    ro, ver, seg, ctx = batch
    calls = []

    def fake_generate(prefixes, n, budgets):
        calls.append((len(prefixes), n))
        # per prefix: one continuation answers the gold of group 1 ("7"), the other does not
        return ["\n</think>\n7", "\n</think>\n0"] * len(prefixes)

    ctx.generate = fake_generate
    values, _ = mc_values(ro, ver, seg, ctx, group_size=2, samples=2, max_new_tokens=16)
    assert calls == [(sum(len(b) for b in seg.boundaries), 2)]
    assert torch.allclose(values[0], torch.full_like(values[0], 0.5))  # gold 7: one of two right
    assert torch.all(values[2] == 0)  # gold 6: never right


def test_utilities_come_from_the_verifiers_judgement_not_a_synthetic_completion(batch):
    # A strict GSM8K verifier scores the synthetic text "</think>\n7</s>" as 0 (no '####'), which once
    # turned every U(a) into 0 and RREDCoT silently into "credit = reward". U(a) is judge(a) now.
    ro, ver, seg, ctx = batch
    ro.texts = ["#### 7", "#### 8", "#### 5", "no answer"]
    ctx.verifier = GSM8KVerifier(mode="strict")
    assert ctx.verifier("</think>\n7</s>", ro.samples[0]).reward == 0.0  # what the old path computed
    values, _ = forced_values(ro, ver, seg, ctx, group_size=2, include_reference=False)
    assert torch.all(values[0] > 0) and torch.all(values[1] > 0)  # "7" is right for group 1
    assert torch.all(values[2] == 0)  # group 2 only answered "5"


def test_several_forcing_texts_average_their_values(batch):
    ro, ver, seg, ctx = batch
    own, own_stats = forced_values(ro, ver, seg, ctx, group_size=2)
    ctx.force_text, ctx.closing_text = "\n", "\n"
    other, _ = forced_values(ro, ver, seg, ctx, group_size=2)
    ctx.force_text, ctx.closing_text = "</think>\n", "</s>"
    both, stats = forced_values(ro, ver, seg, ctx, group_size=2, extra_forcings=[["\n", "\n"]])
    for b, o, t in zip(both, own, other):
        assert torch.allclose(b, (o + t) / 2, atol=1e-6)  # the mean over the task's forcing and the extra one
    assert stats["credit/probe_tokens_per_trace"] > own_stats["credit/probe_tokens_per_trace"]  # both were scored


def test_verdict_values_are_the_yes_share_of_the_policys_own_verdict(batch, monkeypatch):
    ro, ver, seg, ctx = batch
    import rredcot.stages.values as values_mod

    # log p(yes) = -1, log p(no) = -2 at every boundary -> sigmoid(-1 - -2) = sigmoid(1) = 0.731
    monkeypatch.setattr(
        values_mod,
        "score_items",
        lambda model, items, *a: [torch.tensor([[-1.0, -2.0]] * len(it.boundaries)) for it in items],
    )
    values, _ = verdict_values(ro, ver, seg, ctx, verdict_text="\nok? ")
    assert all(torch.allclose(v, torch.full((len(b),), 0.7311), atol=1e-4) for v, b in zip(values, seg.boundaries))
    monkeypatch.undo()
    real, stats = verdict_values(ro, ver, seg, ctx, verdict_text="\nok? ")  # the real model: a probability per boundary
    assert all(v.shape == (len(b),) and torch.all((v > 0) & (v < 1)) for v, b in zip(real, seg.boundaries))
    assert torch.any(real[2] > 0)  # unlike forced answers, it speaks where the group has no right answer
    assert stats["credit/probe_tokens_per_trace"] > 0


def test_anchor_indices_spread_evenly_and_keep_both_ends():
    assert anchor_indices(7, 3) == [0, 3, 6]
    assert anchor_indices(5, 2) == [0, 4]
    assert anchor_indices(4, 1) == [0]
    assert anchor_indices(3, 8) == [0, 1, 2]


def test_blend_takes_mc_levels_at_anchors_and_the_forced_shape_between():
    F = torch.tensor([0.0, 0.1, 0.0, 0.6, 1.0])
    # lerp(mc) = [.4, .55, .7, .85, 1], lerp(F) = [0, .25, .5, .75, 1] -> lerp(mc) + F - lerp(F)
    out = blend_anchors(F, [0, 4], torch.tensor([0.4, 1.0]))
    assert torch.allclose(out, torch.tensor([0.4, 0.4, 0.2, 0.7, 1.0]))
    # one anchor: the forced values shifted so that b_0 carries MC's level; clamped to [0, 1]
    assert torch.allclose(blend_anchors(F, [0], torch.tensor([0.5])), torch.tensor([0.5, 0.6, 0.5, 1.0, 1.0]))
    # anchors everywhere: MC itself
    assert torch.allclose(
        blend_anchors(F, [0, 1, 2, 3, 4], torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])),
        torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]),
    )


def test_mc_at_a_few_boundaries_samples_only_there(batch):
    ro, ver, seg, ctx = batch
    calls = []

    def fake_generate(prefixes, n, budgets):
        calls.append(len(prefixes))
        return ["\n</think>\n7", "\n</think>\n0"] * len(prefixes)

    ctx.generate, ctx.max_new_tokens = fake_generate, 16
    values, stats = forced_values(ro, ver, seg, ctx, group_size=2, mc_boundaries=2, mc_samples=2)
    assert calls == [sum(min(len(b), 2) for b in seg.boundaries)]  # 2 anchors per trace, not K+1
    assert all(abs(float(v[0]) - 0.5) < 1e-6 for v in values[:2])  # gold 7: MC's level 1/2 at b_0
    assert all(abs(float(v[-1]) - (0.5 if len(v) > 0 else 0)) < 1e-6 for v in values[:2])  # and at b_K
    assert "credit/mc_continuations_per_trace" in stats


def test_split_half_reliability_of_values_and_of_credit():
    from rredcot.stages.montecarlo import split_half

    # one trace; even-sample and odd-sample values at 4 boundaries. Credits (differences):
    # [.5, 0, -.5] and [.5, .5, -.5] -> Spearman .866 -> Spearman-Brown 2(.866)/1.866 = .928
    halves = [torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.5, 1.0, 0.5]])]
    rel = split_half(halves)
    assert rel["credit/mc_split_half_credit"] == pytest.approx(0.928, abs=1e-3)
    # values [0, .5, .5, 0] and [0, .5, 1, .5]: Pearson .707 -> .828
    assert rel["credit/mc_split_half"] == pytest.approx(0.828, abs=1e-3)


def test_vps_values_are_the_gold_answers_probability_alone(batch):
    # GRPO-VPS: V_k = p_k(gold) whatever the group answered; with the gold among the group's answers and
    # every other answer wrong, rredcot's V (sum of U(a) p_k(a), only right answers scored) is the same number
    ro, ver, seg, ctx = batch
    vps, _ = forced_values(ro, ver, seg, ctx, group_size=2, answers="gold")
    group, _ = forced_values(ro, ver, seg, ctx, group_size=2, include_reference=True)
    for a, b in zip(vps, group):
        assert torch.allclose(a, b, atol=1e-6) and (a >= 0).all() and (a <= 1).all()


def test_the_prompt_only_boundary_is_scored_once_per_group(batch, monkeypatch):
    import rredcot.stages.values as values_mod
    from rredcot.stages.probes import probe_logprobs_reference

    ro, ver, seg, ctx = batch
    assert all(b[0] == 0 for b in seg.boundaries)  # b_0: the prompt alone
    seen = []
    real = values_mod.score_items
    monkeypatch.setattr(
        values_mod, "score_items", lambda model, items, *a: seen.extend(items) or real(model, items, *a)
    )
    values, _ = forced_values(ro, ver, seg, ctx, group_size=2, include_reference=True)
    plen = [int(m.sum()) for m in ro.prompt_mask]
    for it in seen:  # only the rows that open their groups (0 and 2) score b_0; the others start after it
        assert (it.boundaries[0] == plen[it.row]) == (it.row in (0, 2))
    assert {0, 2} <= {it.row for it in seen}
    for g0 in (0, 2):
        assert torch.equal(values[g0][0], values[g0 + 1][0])  # one prompt, one value at b_0
    # and row 1's values, b_0 included, equal one forward per probe of its own trace
    ids = torch.cat(
        [ro.prompt_ids[1][ro.prompt_mask[1].bool()], ro.completion_ids[1, : int(ro.completion_mask[1].sum())]]
    )
    first = next(it for it in seen if it.row == 0)
    item = type(first)(ids, [plen[1] + b for b in seg.boundaries[1]], first.blocks, first.scored_from)
    p = probe_logprobs_reference(ctx.model, item).exp()  # [K+1, |A|]; U = [1, 0] for answers 7 (right) and 8
    assert torch.allclose(values[1], p[:, 0], atol=1e-5)
