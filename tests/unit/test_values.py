"""Value estimators on a tiny real model: forced-answer values and Monte Carlo values."""
import pytest
import torch

from rredcot.errors import UserError
from rredcot.stages.rollout import sample_rollout
from rredcot.stages.segment import PieceDecoder, run_segment, segment_newline
from rredcot.stages.values import PolicyContext, forced_values, group_answers, mc_values
from rredcot.stages.verify import BuiltinVerifier, GSM8KVerifier, run_verify
from rredcot.types import Sample


@pytest.fixture
def batch(tiny_model):
    model, tok = tiny_model
    torch.manual_seed(0)
    samples = [Sample("a=3, b=a+4. b=?\n", "7"), Sample("x=2, y=x*3. y=?\n", "6")]
    ro = sample_rollout(model, tok, samples, group_size=2, max_new_tokens=16)
    # Give the rollout known texts' answers: the extractor reads ro.texts
    ro.texts = ["<think>\nb=3+4=7\n</think>\n7", "<think>\nb=3+4=8\n</think>\n8", "</think>\n5", "no answer"]
    ver = run_verify(ro.texts, ro.samples, {"accuracy": (BuiltinVerifier(), 1.0)})
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
    assert torch.all(values[2] == 0) and torch.all(values[3] == 0)   # group 2 answered only "5" (wrong)
    assert torch.all(values[0] > 0)                                    # group 1 has the right "7"


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
    assert torch.allclose(values[0], torch.full_like(values[0], 0.5))   # gold 7: one of two right
    assert torch.all(values[2] == 0)                                    # gold 6: never right


def test_utilities_come_from_the_verifiers_judgement_not_a_synthetic_completion(batch):
    # A strict GSM8K verifier scores the synthetic text "</think>\n7</s>" as 0 (no '####'), which once
    # turned every U(a) into 0 and RREDCoT silently into "credit = reward". U(a) is judge(a) now.
    ro, ver, seg, ctx = batch
    ro.texts = ["#### 7", "#### 8", "#### 5", "no answer"]
    ctx.verifier = GSM8KVerifier(mode="strict")
    assert ctx.verifier("</think>\n7</s>", ro.samples[0]).reward == 0.0     # what the old path computed
    values, _ = forced_values(ro, ver, seg, ctx, group_size=2, include_reference=False)
    assert torch.all(values[0] > 0) and torch.all(values[1] > 0)           # "7" is right for group 1
    assert torch.all(values[2] == 0)                                        # group 2 only answered "5"
