"""Dynamic sampling (DAPO's filter_groups) and overlong shaping on hand-made rollouts: which groups a step
keeps, the counts it logs, the cap, and the same batch on one process and on two (two threads standing in
for two ranks, through the collectives the module calls)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from rredcot import collectives
from rredcot.assemble import PromptSampler
from rredcot.dynamic_sampling import cat_rollouts, fill_batch, select_groups, take_rollout
from rredcot.stages.shaping import overlong_penalty, shape_overlong
from rredcot.types import Rollout, Sample, Verified

G, P, PAD = 2, 4, 9  # completions per prompt, prompts per round, the pad id


def _rollout(keys: list[tuple[int, int]]) -> Rollout:
    """G rows per (round, slot): prompts of 1-3 tokens (left-padded), completions of 1-4 (right-padded)."""
    rows = [(j, s, i) for j, s in keys for i in range(G)]
    plen = [1 + s % 3 for _, s, _ in rows]
    clen = [1 + (s + i + j) % 4 for j, s, i in rows]
    Pw, Tw = max(plen), max(clen)
    pm = torch.tensor([[0] * (Pw - n) + [1] * n for n in plen])
    cm = torch.tensor([[1] * n + [0] * (Tw - n) for n in clen])
    ids = torch.tensor([100 + 10 * ((j * P + s) * G + i) for j, s, i in rows])[:, None]  # by global row
    return Rollout(
        torch.where(pm.bool(), ids, PAD),
        pm,
        torch.where(cm.bool(), ids + torch.arange(Tw), PAD),
        cm,
        -0.1 * cm.float(),
        0.5 * cm.float(),
        torch.tensor([n == 4 for n in clen]),
        [f"r{j}s{s}c{i}" for j, s, i in rows],
        [Sample(f"q{j}.{s}", "1") for j, s, _ in rows],
        G,
    )


def _verified(rewards: list[float]) -> Verified:
    r = torch.tensor(rewards)
    return Verified(r, {"accuracy": r.clone()}, r == 1.0, ["x"] * len(rewards))


def _draw_from(equal: set[tuple[int, int]], calls: list[int]):
    """draw(round): this rank's block of round j's P slots; group (j, s) has rewards [1, 1] if in `equal`,
    else [1, 0]."""

    def draw(j: int):
        calls.append(j)
        offset, slots = collectives.shard(list(range(P)))
        keys = [(j, s) for s in slots]
        rewards = [x for k in keys for x in ([1.0, 1.0] if k in equal else [1.0, 0.0])]
        return _rollout(keys), _verified(rewards)

    return draw


def test_select_groups():
    T, F = True, False
    assert select_groups([T, F, T, F, F, T], 3) == [1, 3, 4]  # the first three with a signal
    assert select_groups([T, F, T], 3) == [0, 1, 2]  # short of them: the first dropped ones fill in
    assert select_groups([T, T, F, F, T, T], 3) == [0, 2, 3]


def test_a_step_draws_until_it_is_full_and_counts():
    equal = {(0, 0), (0, 2), (1, 1)}  # round 0 keeps 2 of 4; round 1 gives 3 more, of which 2 are needed
    calls: list[int] = []
    ro, ver, stats = fill_batch(_draw_from(equal, calls), P, G, max_extra=5, pad_id=PAD)
    assert calls == [0, 1]
    assert ro.texts[::G] == ["r0s1c0", "r0s3c0", "r1s0c0", "r1s2c0"]
    assert ver.rewards.tolist() == [1.0, 0.0] * P and ro.completion_ids.shape[0] == P * G
    assert stats == {
        "sampling/extra_batches": 1.0,
        "sampling/dropped_groups": 3.0,
        "sampling/filled_groups": 0.0,
        "sampling/surplus_groups": 1.0,  # (1, 3): a signal, drawn past the need
    }
    assert len(ro.samples) == len(ver.extractor) == ro.prompt_ids.shape[0] == P * G


def test_at_the_cap_the_step_is_filled_with_the_first_dropped_groups():
    equal = {(j, s) for j in range(3) for s in range(P)} - {(1, 2)}  # one group with a signal in 3 rounds
    calls: list[int] = []
    ro, _, stats = fill_batch(_draw_from(equal, calls), P, G, max_extra=2, pad_id=PAD)
    assert calls == [0, 1, 2]
    assert ro.texts[::G] == ["r0s0c0", "r0s1c0", "r0s2c0", "r1s2c0"]  # in drawing order
    assert stats["sampling/filled_groups"] == 3 and stats["sampling/dropped_groups"] == 3 * P - 1 - 3


def test_a_round_that_is_all_signal_is_the_plain_step():
    calls: list[int] = []
    drawn = []
    draw = _draw_from(set(), calls)
    ro, ver, stats = fill_batch(lambda j: drawn.append(draw(j)) or drawn[-1], P, G, max_extra=3, pad_id=PAD)
    assert calls == [0] and ro is drawn[0][0] and ver is drawn[0][1]  # nothing moved, nothing copied
    assert stats["sampling/extra_batches"] == 0 and stats["sampling/dropped_groups"] == 0


def test_the_prompt_stream_is_the_whole_state_so_a_resume_draws_the_same():
    # every round takes the stream's next P prompts: after a step of 3 rounds, drawn = 3 P, and a sampler
    # restored at that count (a checkpoint's `drawn`) continues as the one that drew them
    live = PromptSampler(50, seed=3)
    equal = {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}
    calls: list[int] = []
    inner = _draw_from(equal, calls)
    fill_batch(lambda j: (live.take(P), inner(j))[1], P, G, max_extra=4, pad_id=PAD)
    assert calls == [0, 1, 2] and live.drawn == 3 * P
    assert PromptSampler(50, seed=3, drawn=live.drawn).take(P) == live.take(P)


def test_rollouts_are_padded_on_their_sides_and_trimmed_to_the_rows_taken():
    a, b = _rollout([(0, 0)]), _rollout([(0, 2)])  # prompts of 1 and 3 tokens; completions of 1-2 and 3-4
    both = cat_rollouts([a, b], PAD)
    assert both.prompt_ids.shape == (4, 3) and both.prompt_mask[:2].tolist() == [[0, 0, 1]] * 2
    assert (both.prompt_ids[:2, :2] == PAD).all() and (both.completion_ids[:2, 2:] == PAD).all()
    first = take_rollout(both, [0, 1])  # a's rows: back to a's own widths
    for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs", "truncated"):
        assert torch.equal(getattr(first, k), getattr(a, k)), k
    assert first.texts == a.texts and first.samples == a.samples


class _Threads:
    """W ranks as W threads: rank, size and gather of rredcot.collectives, as a process group would give them."""

    def __init__(self, monkeypatch, size: int):
        self.size, self.local, self.box = size, threading.local(), [None] * size
        self.barrier = threading.Barrier(size)
        monkeypatch.setattr(collectives, "active", lambda: True)
        monkeypatch.setattr(collectives, "size", lambda: size)
        monkeypatch.setattr(collectives, "rank", lambda: self.local.rank)
        monkeypatch.setattr(collectives, "gather", self.gather)

    def gather(self, obj):
        self.box[self.local.rank] = obj
        self.barrier.wait()
        out = list(self.box)
        self.barrier.wait()
        return out

    def run(self, fn):
        results, errors = [None] * self.size, []

        def body(r):
            self.local.rank = r
            try:
                results[r] = fn()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        return results


def _rows(ro: Rollout, ver: Verified) -> list[tuple]:
    """Each row's text, reward and real tokens: what must not depend on the world size."""
    return [
        (ro.texts[i], float(ver.rewards[i]), ro.prompt_ids[i][ro.prompt_mask[i].bool()].tolist(),
         ro.completion_ids[i][ro.completion_mask[i].bool()].tolist(), bool(ro.truncated[i]))
        for i in range(len(ro.texts))
    ]  # fmt: skip


def test_two_ranks_train_on_the_groups_one_process_would(monkeypatch):
    equal = {(0, 0), (0, 3), (1, 1), (1, 2), (2, 0)}  # kept: (0,1) (0,2) (1,0) (1,3); round 2 is never drawn
    one_calls: list[int] = []
    ro, ver, stats = fill_batch(_draw_from(equal, one_calls), P, G, max_extra=5, pad_id=PAD)
    world = _Threads(monkeypatch, 2)
    calls: list[int] = []
    parts = world.run(lambda: fill_batch(_draw_from(equal, calls), P, G, max_extra=5, pad_id=PAD))
    assert one_calls == [0, 1] and sorted(calls) == [0, 0, 1, 1]  # every rank draws every round
    assert [p[2] for p in parts] == [stats, stats]  # the counts: global, the same on each rank
    assert _rows(*parts[0][:2]) + _rows(*parts[1][:2]) == _rows(ro, ver)  # rank 0's block, then rank 1's
    assert [p[0].texts[0] for p in parts] == ["r0s1c0", "r1s0c0"]


# ---- overlong shaping ----------------------------------------------------------------------------------------


def test_overlong_penalty_is_dapos_linear_ramp():
    # max_new_tokens 100, buffer 20: no penalty up to 80 tokens, then down to -penalty at 100
    lengths = torch.tensor([50, 80, 90, 100])
    assert overlong_penalty(lengths, 100, 20, 1.0).tolist() == pytest.approx([0, 0, -0.5, -1.0])
    assert overlong_penalty(lengths, 100, 20, 0.5).tolist() == pytest.approx([0, 0, -0.25, -0.5])
    assert overlong_penalty(lengths, 100, 0, 1.0).tolist() == [0, 0, 0, 0]  # buffer 0: off


def test_shaping_adds_the_penalty_and_keeps_undefined_rewards_undefined():
    ro = _rollout([(0, 0), (0, 2)])  # completion lengths 1, 2, 3, 4
    ver = _verified([1.0, 0.0, math.nan, 1.0])
    shaped = shape_overlong(ro, ver, max_new_tokens=4, buffer=2, penalty=1.0)  # penalty from 3 tokens: -.5, -1
    assert shaped.rewards[:2].tolist() == [1.0, 0.0] and math.isnan(shaped.rewards[2])
    assert shaped.rewards[3].item() == pytest.approx(0.0)
    assert shaped.per_func["overlong"].tolist() == pytest.approx([0, 0, -0.5, -1.0])
    assert shaped.correct.tolist() == ver.correct.tolist()  # accuracy is the verifier's, unshaped
    assert shape_overlong(ro, ver, max_new_tokens=4, buffer=0, penalty=1.0) is ver
