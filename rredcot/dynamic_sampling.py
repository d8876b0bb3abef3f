"""Dynamic sampling (DAPO, arXiv 2503.14476, section 3.2; verl's algorithm.filter_groups): a step's groups whose
rewards are all equal (advantages.py's rule: GRPO's advantage is 0 on every token) are dropped, and more
generation batches of P prompts are drawn until P groups with a signal are in hand, at most
train.max_extra_generation_batches more; past that the step is filled with the first dropped groups, so its
size (and the update's batch arithmetic) never changes. verl raises an error there instead.

The same at any world size and on resume: round j's prompts are the prompt stream's next P (every rank draws
them; `drawn`, the stream's whole state, is checkpointed), its completions are keyed by global rows j * N + i
(round 0's are the plain step's), which groups are kept is decided on every rank's verdicts in global order,
and the chosen groups are then dealt out to the ranks in contiguous blocks (collectives.py), so rank r holds
the chosen groups a one-process run would give its slots.

Shapes: P prompts a round, G completions each, N = P * G rows; rollouts' rows are in global order.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Callable

import torch
import torch.nn.functional as F

from rredcot import collectives
from rredcot.advantages import equal_reward_groups
from rredcot.types import Rollout, Verified

Draw = Callable[[int], tuple[Rollout, Verified]]  # round j -> this rank's block of round j's prompts, verified


def fill_batch(
    draw: Draw, prompts: int, group_size: int, max_extra: int, pad_id: int
) -> tuple[Rollout, Verified, dict[str, float]]:
    """This rank's share of the step's `prompts` groups, drawn in rounds until enough have a signal, and the
    counts logged (sampling/*, the same on every rank). Every rank calls it: it gathers every round's verdicts."""
    rounds = [draw(0)]
    equal = global_equal(rounds[0][1], group_size)
    while equal.count(False) < prompts and len(rounds) <= max_extra:
        rounds.append(draw(len(rounds)))
        equal += global_equal(rounds[-1][1], group_size)
    chosen = select_groups(equal, prompts)
    stats = sampling_stats(equal, chosen, len(rounds))
    if chosen == list(range(prompts)):  # round 0 as it is: nothing to move
        return (*rounds[0], stats)
    return (*share_of(rounds, chosen, group_size, pad_id), stats)


def global_equal(ver: Verified, group_size: int) -> list[bool]:
    """Whether each group of the round has all-equal rewards, every rank's in global order (a collective)."""
    mine = equal_reward_groups(ver.rewards, group_size).view(-1, group_size)[:, 0].tolist()
    return [e for part in collectives.gather(mine) for e in part]


def select_groups(equal: list[bool], want: int) -> list[int]:
    """The first `want` groups with a signal, in drawing order; short of them, the first dropped ones fill in.
    Example: equal [T, F, T, F | F, T], want 3 -> [1, 3, 4]; equal [T, F, T], want 3 -> [0, 1, 2]."""
    kept = [i for i, e in enumerate(equal) if not e][:want]
    filled = [i for i, e in enumerate(equal) if e][: want - len(kept)]
    return sorted(kept + filled)


def sampling_stats(equal: list[bool], chosen: list[int], rounds: int) -> dict[str, float]:
    """sampling/extra_batches (rounds past the first), dropped_groups (all-equal groups left out),
    filled_groups (all-equal groups trained on: the cap was reached), surplus_groups (groups with a signal
    drawn past the step's need)."""
    picked = set(chosen)
    filled = sum(equal[i] for i in chosen)
    return {
        "sampling/extra_batches": float(rounds - 1),
        "sampling/dropped_groups": float(sum(equal) - filled),
        "sampling/filled_groups": float(filled),
        "sampling/surplus_groups": float(sum(1 for i, e in enumerate(equal) if not e and i not in picked)),
    }


def share_of(
    rounds: list[tuple[Rollout, Verified]], chosen: list[int], group_size: int, pad_id: int
) -> tuple[Rollout, Verified]:
    """This rank's contiguous block of the `chosen` groups (global indices over all rounds), from whichever
    rank sampled them: every rank's rounds are gathered (on the CPU when there are several processes)."""
    device = rounds[0][0].completion_ids.device
    many = collectives.active()
    mine = [(_to(ro, "cpu") if many else ro, ver) for ro, ver in rounds]
    parts = collectives.gather(mine)  # [rank][round]
    by_round = [[p[j] for p in parts] for j in range(len(rounds))]  # a round's ranks in order: its global rows
    ro = cat_rollouts([r for rnd in by_round for r, _ in rnd], pad_id)
    ver = cat_verified([v for rnd in by_round for _, v in rnd])
    _, groups = collectives.shard(chosen)
    rows = [g * group_size + i for g in groups for i in range(group_size)]
    return _to(take_rollout(ro, rows), device), take_verified(ver, rows)


def _to(ro: Rollout, device) -> Rollout:
    moved = {
        f.name: getattr(ro, f.name).to(device) for f in fields(ro) if isinstance(getattr(ro, f.name), torch.Tensor)
    }
    return replace(ro, **moved)


def _pad(t: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    return F.pad(t, (extra, 0) if left else (0, extra), value=value)


def cat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts' rows one after another: prompts left-padded (pad_id, mask 0), completions right-padded
    (pad_id, mask and log-probs 0) to the widest part."""
    P = max(r.prompt_ids.shape[1] for r in parts)
    T = max(r.completion_ids.shape[1] for r in parts)

    def cat(name: str, width: int, value: float, left: bool = False) -> torch.Tensor:
        return torch.cat([_pad(getattr(r, name), width, value, left) for r in parts])

    return Rollout(
        cat("prompt_ids", P, pad_id, left=True),
        cat("prompt_mask", P, 0, left=True),
        cat("completion_ids", T, pad_id),
        cat("completion_mask", T, 0),
        cat("logprobs", T, 0),
        cat("entropies", T, 0),
        torch.cat([r.truncated for r in parts]),
        [x for r in parts for x in r.texts],
        [x for r in parts for x in r.samples],
        parts[0].group_size,
        sampler_logprobs=None if parts[0].sampler_logprobs is None else cat("sampler_logprobs", T, 0),
    )


def take_rollout(ro: Rollout, rows: list[int]) -> Rollout:
    """The rows `rows` of `ro`, padding columns no chosen row uses trimmed (left of the prompts, right of
    the completions), as a batch sampled on its own would be."""
    idx = torch.tensor(rows, dtype=torch.long, device=ro.completion_ids.device)
    pm, cm = ro.prompt_mask[idx], ro.completion_mask[idx]
    used = pm.any(0).nonzero()
    lo = int(used[0]) if used.numel() else 0
    hi = max(int(cm.any(0).nonzero().max()) + 1 if cm.any() else 1, 1)
    two = lambda t, cols: t[idx][:, cols]  # noqa: E731
    return Rollout(
        two(ro.prompt_ids, slice(lo, None)),
        pm[:, lo:],
        two(ro.completion_ids, slice(0, hi)),
        cm[:, :hi],
        two(ro.logprobs, slice(0, hi)),
        two(ro.entropies, slice(0, hi)),
        ro.truncated[idx],
        [ro.texts[i] for i in rows],
        [ro.samples[i] for i in rows],
        ro.group_size,
        sampler_logprobs=None if ro.sampler_logprobs is None else two(ro.sampler_logprobs, slice(0, hi)),
    )


def cat_verified(parts: list[Verified]) -> Verified:
    return Verified(
        torch.cat([v.rewards for v in parts]),
        {k: torch.cat([v.per_func[k] for v in parts]) for k in parts[0].per_func},
        torch.cat([v.correct for v in parts]),
        [x for v in parts for x in v.extractor],
    )


def take_verified(ver: Verified, rows: list[int]) -> Verified:
    idx = torch.tensor(rows, dtype=torch.long)
    return Verified(
        ver.rewards[idx],
        {k: v[idx] for k, v in ver.per_func.items()},
        ver.correct[idx],
        [ver.extractor[i] for i in rows],
    )
