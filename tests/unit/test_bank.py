"""The reference-solution bank (stages/bank.py): which continuation each boundary is offered, that its value is
the policy's probability of that text (checked against one forward per probe), and how it mixes with the
forced answers; the tasks' solutions as the bank reads them."""

import pytest
import torch

from rredcot.stages.bank import bank_for, lines_written, solution_lines, solution_values, thinking_part
from rredcot.stages.context import PolicyContext, _encode
from rredcot.stages.probes import ProbeItem, probe_logprobs_batch, probe_logprobs_cached, probe_logprobs_reference
from rredcot.stages.segment import PieceDecoder, run_segment, segment_newline
from rredcot.stages.values import forced_values
from rredcot.stages.verify import BuiltinVerifier, RewardFuncs, run_verify
from rredcot.task.arith import ArithSpec, generate, solution_of
from rredcot.task.hub import solution_text
from rredcot.types import Rollout, Sample

REF = "b=3+4=7\nc=7*2=14\n"
PROMPT = "a=3, b=a+4, c=b*2. c=?\n"
TEXTS = [  # a right trace, one wrong at its second step, one wrong at its first
    "<think>\nb=3+4=7\nc=7*2=14\n</think>\n14",
    "<think>\nb=3+4=7\nc=7*2=15\n</think>\n15",
    "<think>\nb=3+4=8\nc=8*2=16\n</think>\n16",
]


def rollout(tok, texts=TEXTS, solution=REF) -> Rollout:
    """A rollout of known completions (EOS-ended), the group of one prompt."""
    sample = Sample(PROMPT, "14", {"solution": solution})
    p = _encode(tok, PROMPT)
    comps = [torch.cat([_encode(tok, t), torch.tensor([tok.eos_token_id])]) for t in texts]
    T = max(len(c) for c in comps)
    ids = torch.full((len(texts), T), tok.pad_token_id)
    mask = torch.zeros(len(texts), T, dtype=torch.long)
    for i, c in enumerate(comps):
        ids[i, : len(c)], mask[i, : len(c)] = c, 1
    n = len(texts)
    return Rollout(
        p.repeat(n, 1), torch.ones(n, len(p), dtype=torch.long), ids, mask, torch.zeros(n, T), torch.ones(n, T),
        torch.zeros(n, dtype=torch.bool), list(texts), [sample] * n, n,
    )  # fmt: skip


@pytest.fixture
def batch(tiny_model):
    model, tok = tiny_model
    ro = rollout(tok)
    ver = run_verify(ro.texts, ro.samples, RewardFuncs(BuiltinVerifier()))
    seg = run_segment(ro, segment_newline, PieceDecoder(tok))
    return ro, ver, seg, PolicyContext(model, tok, BuiltinVerifier(), "</think>\n", "</s>")


def test_solution_lines_and_the_steps_a_prefix_has_written(tiny_model):
    _, tok = tiny_model
    assert solution_lines("<think>\na=1\n\nb=2\n</think>\n") == ["a=1", "b=2"]
    assert thinking_part(TEXTS[0]) == "<think>\nb=3+4=7\nc=7*2=14\n"
    ids = _encode(tok, TEXTS[0]).tolist()
    # the built-in tokenizer: '<think>' one token, then one per character; 'b=3+4=7\n' ends at 10
    assert [lines_written(tok, ids, b) for b in (0, 2, 6, 10, 19)] == [0, 0, 0, 1, 2]


def test_newline_boundaries_of_the_batch(batch):
    _, _, seg, _ = batch
    assert seg.boundaries[0] == [0, 2, 10, 19]  # b_0, after '<think>\n', after each step


def test_each_boundary_is_offered_the_reference_steps_it_has_not_written(batch):
    ro, ver, seg, ctx = batch
    values, stats = solution_values(ro, ver, seg, ctx, group_size=3)
    tok, rows = ctx.tokenizer, []
    for b, left in zip(seg.boundaries[1], (REF, REF, "c=7*2=14\n", None)):
        # after 0, 0, 1, 2 written steps: the whole reference, the whole, its last step, nothing (forced answer)
        text = (left + "</think>\n14</s>") if left else "</think>\n14</s>"
        block = _encode(tok, text.replace("</s>", "")).tolist() + [tok.eos_token_id]
        skip = 0 if left else 2  # '</think>', '\n': the forcing text's own tokens are not scored
        rows.append((b, torch.tensor(block), skip))
    ids = torch.cat([_encode(tok, PROMPT), ro.completion_ids[1, : int(ro.lengths[1])]])
    P = len(_encode(tok, PROMPT))
    item = ProbeItem(ids, [P + b for b, _, _ in rows], [], [], own=[[(blk, s)] for _, blk, s in rows])
    expected = probe_logprobs_reference(ctx.model, item)[:, 0].double().exp().float()
    assert torch.allclose(values[1], expected, rtol=1e-4, atol=1e-12)
    assert stats["credit/bank_groups_frac"] == 1.0


def test_the_start_reading_offers_the_whole_solution_everywhere(batch):
    ro, ver, seg, ctx = batch
    aligned, _ = solution_values(ro, ver, seg, ctx, group_size=3)
    start, _ = solution_values(ro, ver, seg, ctx, group_size=3, solution_from="start")
    assert torch.allclose(start[0][:2], aligned[0][:2])  # nothing written yet: the same probe
    assert not torch.allclose(start[0][2:], aligned[0][2:])


def test_a_group_without_a_reference_has_zero_values_and_says_so(tiny_model):
    model, tok = tiny_model
    ro = rollout(tok, solution=None)
    ver = run_verify(ro.texts, ro.samples, RewardFuncs(BuiltinVerifier()))
    seg = run_segment(ro, segment_newline, PieceDecoder(tok))
    ctx = PolicyContext(model, tok, BuiltinVerifier(), "</think>\n", "</s>")
    values, stats = solution_values(ro, ver, seg, ctx, group_size=3)
    assert all(torch.all(v == 0) for v in values) and stats["credit/bank_groups_frac"] == 0.0
    # the group's own right trace fills the bank instead
    assert bank_for(ro, ver, 0, 3, "group") == [["b=3+4=7", "c=7*2=14"]]
    _, stats = solution_values(ro, ver, seg, ctx, group_size=3, bank="group")
    assert stats["credit/bank_groups_frac"] == 1.0


def test_both_banks_deduplicate_the_reference(batch):
    ro, ver, *_ = batch
    assert bank_for(ro, ver, 0, 3, "both") == [["b=3+4=7", "c=7*2=14"]]  # the right trace is the reference


def test_solution_weight_mixes_the_bank_with_the_forced_answers(batch):
    ro, ver, seg, ctx = batch
    answers, _ = forced_values(ro, ver, seg, ctx, group_size=3)
    bank, _ = forced_values(ro, ver, seg, ctx, group_size=3, solution_weight=1.0)
    mixed, stats = forced_values(ro, ver, seg, ctx, group_size=3, solution_weight=0.25)
    for a, b, m in zip(answers, bank, mixed):
        assert torch.allclose(m, 0.75 * a + 0.25 * b)
    alone, _ = solution_values(ro, ver, seg, ctx, group_size=3)
    assert all(torch.allclose(b, s) for b, s in zip(bank, alone))
    assert stats["credit/probe_tokens_per_trace"] > 0


def test_per_boundary_probes_agree_on_all_three_paths(tiny_model):
    model, tok = tiny_model
    ids = _encode(tok, PROMPT + TEXTS[0])
    own = [[(_encode(tok, t), s)] for t, s in (("b=3+4=7\n</think>\n14", 0), ("</think>\n14", 2), ("x", 0))]
    item = ProbeItem(ids, [24, 32, 40], [], [], own=own)
    ref = probe_logprobs_reference(model, item)
    assert ref.shape == (3, 1) and item.probe_tokens == 12 + 4 + 1
    assert torch.allclose(probe_logprobs_batch(model, [item])[0], ref, atol=1e-4)
    assert torch.allclose(probe_logprobs_cached(model, item), ref, atol=1e-4)


def test_tasks_store_their_reasoning_as_the_solution():
    s = generate(ArithSpec(), "train", 3, seed=0)[0]
    assert s.meta["solution"] == solution_of(s.meta["trace"], s.gold)
    assert s.meta["trace"] == "<think>\n" + s.meta["solution"] + "</think>\n" + s.gold
    assert solution_of("<think>\na=1\n</think>\n3", "2") is None  # a trace with a wrong answer is no solution
    gsm = "She sold 48/2 = <<48/2=24>>24 clips.\n#### 72"
    assert solution_text(gsm, "gsm8k") == "She sold 48/2 = 24 clips.\n"
    assert solution_text("x=2.\nSo \\boxed{4}.", "boxed") == "x=2.\n"
