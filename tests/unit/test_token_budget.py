"""Padding-free micro-batches (update.micro_batch_tokens; rredcot/stages/micro_batches.py): trimming the padding
columns and packing rows to a token budget change no gradient and no logged number, for every loss type.

The reference is the update with micro_batch_size rows per micro-batch forwarded at the full padded width (the
update before trimming: `extents` patched to say every row fills every column)."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from omegaconf import OmegaConf

from rredcot.compose import load_config
from rredcot.errors import UserError
from rredcot.stages import micro_batches, update
from rredcot.stages.micro_batches import Micro, by_tokens, extents, matched, plan_steps
from rredcot.stages.update import Learner, update_policy
from rredcot.types import Rollout

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo", "cispo", "vespo"]
N, P, T = 16, 7, 24  # rows, prompt and completion columns
TOL = dict(atol=1e-5, rtol=1e-5)


def _rollout(vocab: int, sampler: bool = True) -> Rollout:
    """N rows: prompts of 2..7 tokens left-padded, completions of 1..24 tokens right-padded, very uneven."""
    g = torch.Generator().manual_seed(0)
    p_len = torch.randint(2, P + 1, (N,), generator=g)
    c_len = torch.tensor([1, 24, 3, 9, 2, 17, 5, 1, 12, 4, 20, 2, 6, 3, 11, 8])
    prompt_mask = (torch.arange(P) >= P - p_len[:, None]).long()  # [N, P] left padding
    completion_mask = (torch.arange(T) < c_len[:, None]).long()  # [N, T] right padding
    prompt_ids = torch.randint(3, vocab, (N, P), generator=g) * prompt_mask
    completion_ids = torch.randint(3, vocab, (N, T), generator=g) * completion_mask
    logprobs = -torch.rand(N, T, generator=g) * 3
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=logprobs,
        entropies=torch.zeros(N, T),
        truncated=c_len == T,
        texts=[""] * N,
        samples=[],
        group_size=4,
        sampler_logprobs=logprobs + 0.1 * torch.randn(N, T, generator=g) if sampler else None,
    )


def _credit(token_level: bool) -> types.SimpleNamespace:
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(N, T, generator=g) if token_level else torch.randn(N, generator=g)
    valid = torch.ones(N, dtype=torch.bool)
    valid[5] = False  # an undefined reward: out of the loss
    return types.SimpleNamespace(advantages=adv, valid=valid)


class _SGD:
    """Records each optimizer step's gradients (every parameter), then takes a plain SGD step, so that the next
    optimizer step's ratios differ from 1 (clipping, cispo's cap and vespo's weight come into play)."""

    def __init__(self, model):
        self.model, self.grads = model, []

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters()})
        with torch.no_grad():
            for p in self.model.parameters():
                p -= 0.5 * p.grad

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


class _Constant:
    def step(self):
        pass

    def get_last_lr(self):
        return [0.0]


def _cfg(loss_type: str, **changes):
    base = {
        "loss_type": loss_type,
        "eps_low": 0.2,
        "eps_high": 5.0 if loss_type == "cispo" else 0.2,
        "beta": 0.0,
        "num_iterations": 1,
        "steps_per_generation": 2,  # 2 optimizer steps of 8 rows: 2 chunks of 4 rows each
        "micro_batch_size": 4,
        "micro_batch_tokens": None,
        "mask_truncated_completions": False,
        "max_grad_norm": 1e9,  # no clipping: the gradients are compared as summed
        "is_cap": 2.0,
    }
    return OmegaConf.create({**base, **changes})


def _run(model, rollout, credit, cfg, *, full_width: bool = False, monkeypatch=None):
    """(every optimizer step's gradients, the logged stats) of update_policy on a copy of `model`."""
    net = copy.deepcopy(model)
    ref = copy.deepcopy(model) if cfg.beta > 0 else None
    if ref is not None:  # the same reference on every call
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    if full_width:  # the update before trimming: every row spans every column
        monkeypatch.setattr(update, "extents", lambda pm, cm: ([pm.shape[1]] * len(pm), [cm.shape[1]] * len(cm)))
    from accelerate import Accelerator

    opt = _SGD(net)
    learner = Learner(net, opt, _Constant(), Accelerator(cpu=True), ref)
    stats = update_policy(learner, rollout, credit, cfg, temperature=0.7, max_completion_length=T)
    if full_width:
        monkeypatch.undo()
    return opt.grads, stats


def _assert_same(a, b):
    (ga, sa), (gb, sb) = a, b
    assert len(ga) == len(gb) >= 2  # every optimizer step
    for step_a, step_b in zip(ga, gb):
        for name in step_a:
            torch.testing.assert_close(step_a[name], step_b[name], **TOL, msg=name)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sb[k] == pytest.approx(sa[k], rel=1e-5, abs=1e-6), k


# micro-batch sizes (rows) each budget packs step 0 into, from the rows' prompt + completion lengths:
# 10_000: one micro-batch; 160: uneven (e.g. 1, 2, 5 rows); 1: under any row's size, every row alone
BUDGETS = [10_000, 160, 1]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_token_budget_gives_the_gradients_and_stats_of_micro_batch_size(tiny_model, monkeypatch, loss_type):
    model, tok = tiny_model
    rollout, credit = _rollout(len(tok)), _credit(token_level=loss_type in ("grpo", "dapo", "vespo"))
    today = _run(model, rollout, credit, _cfg(loss_type), full_width=True, monkeypatch=monkeypatch)
    assert all(g.abs().max() > 0 for g in today[0][1].values() if g.numel() > 1)  # not vacuous
    for budget in BUDGETS:
        _assert_same(today, _run(model, rollout, credit, _cfg(loss_type, micro_batch_tokens=budget)))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"beta": 0.1, "num_iterations": 2, "mask_truncated_completions": True},
        {"importance_sampling_level": "sequence", "is_mode": "sequence_mask"},
    ],
)
def test_trimming_the_padding_columns_changes_nothing(tiny_model, monkeypatch, changes):
    model, tok = tiny_model
    rollout, credit = _rollout(len(tok)), _credit(token_level=True)
    cfg = _cfg("grpo", **changes)
    today = _run(model, rollout, credit, cfg, full_width=True, monkeypatch=monkeypatch)
    _assert_same(today, _run(model, rollout, credit, cfg))
    if changes:  # the reference model, old log-probs and sequence ratios through a budget too
        _assert_same(today, _run(model, rollout, credit, _cfg("grpo", **changes, micro_batch_tokens=160)))


def test_micro_batches_keep_the_steps_rows_the_budget_and_only_used_columns():
    rollout = _rollout(50)
    pe, te = extents(rollout.prompt_mask, rollout.completion_mask)
    assert pe == rollout.prompt_mask.sum(-1).tolist() and te == rollout.completion_mask.sum(-1).tolist()
    rows = torch.arange(N).view(-1, 2).T  # [spg, N / spg]
    for budget in [None, *BUDGETS]:
        steps = plan_steps(rows, _cfg("grpo", micro_batch_tokens=budget), pe, te)
        for s, micros in enumerate(steps):
            got = torch.cat([m.rows for m in micros])
            assert sorted(got.tolist()) == sorted(rows[s].tolist())  # every row of step s, once
            assert all(torch.equal(rows[s][m.pos], m.rows) for m in micros)
            for m in micros:
                assert m.p == max(pe[r] for r in m.rows.tolist()) and m.t == max(te[r] for r in m.rows.tolist())
                assert budget is None or m.tokens <= budget or len(m.rows) == 1
        if budget is None:  # today's: 4 rows at a time in the step's order
            assert [m.rows.tolist() for m in steps[0]] == [[0, 2, 4, 6], [8, 10, 12, 14]]
    uneven = {len(m.rows) for m in plan_steps(rows, _cfg("grpo", micro_batch_tokens=160), pe, te)[0]}
    assert len(uneven) > 1  # the budget of the tests above splits unevenly


def test_packing_example_and_extents_example():
    assert extents(torch.tensor([[0, 1, 1]]), torch.tensor([[1, 1, 0, 0]])) == ([2], [2])
    assert extents(torch.tensor([[0, 0]]), torch.tensor([[0, 0]])) == ([0], [0])
    rows = torch.arange(4)
    micros = by_tokens(rows, 12, [0, 0, 0, 0], [6, 2, 10, 5])  # lengths 6, 2, 10, 5 -> 10 | 6, 5 | 2
    assert [m.rows.tolist() for m in micros] == [[2], [0, 3], [1]]


def test_ranks_get_the_same_number_of_micro_batches(monkeypatch):
    """Under FSDP2 / ZeRO every pass is a collective: a rank that packed fewer micro-batches halves its largest."""
    pe, te = [1] * 8, [9, 8, 7, 6, 5, 4, 3, 2]
    rows = torch.arange(8).view(1, -1)
    mine = [by_tokens(rows[0], 100, pe, te)]  # 8 x 10 = 80 tokens: one micro-batch
    monkeypatch.setattr(micro_batches.collectives, "gather", lambda counts: [counts, [3]])  # another rank has 3
    (out,) = matched(mine, rows, pe, te)
    assert [m.rows.tolist() for m in out] == [[0, 1], [2, 3], [4, 5, 6, 7]]
    assert all(isinstance(m, Micro) and m.t == max(te[r] for r in m.rows.tolist()) for m in out)


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "many", "true"])
def test_a_bad_micro_batch_tokens_is_refused_at_config_time(value):
    with pytest.raises(UserError) as e:
        load_config([f"update.micro_batch_tokens={value}"])
    msg = " ".join(str(e.value).split())
    assert e.value.exit_code == 2 and "update.micro_batch_tokens" in msg and "\n\n" not in str(e.value)
    assert "an integer >= 1 (or null)" in msg and "update.micro_batch_tokens=..." in msg


def test_micro_batch_tokens_is_off_by_default_and_takes_a_count():
    assert load_config([])["update"].micro_batch_tokens is None
    assert load_config(["update.micro_batch_tokens=16384"])["update"].micro_batch_tokens == 16384
