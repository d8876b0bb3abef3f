"""The update's micro-batches: which rows of an optimizer step each forward/backward takes, and which columns.

Every micro-batch keeps only the columns its rows use: prompts are left-padded, so its leading all-pad prompt
columns are dropped; completions are right-padded (pad after EOS), so its trailing all-pad completion columns
are. Position ids count real tokens only (rredcot/logprobs.py), so the dropped columns change no log-prob.
Rows: update.micro_batch_size at a time, in the step's order (the default), or, with update.micro_batch_tokens,
as many as fit rows x (prompt columns + completion columns) <= the budget (verl's use_dynamic_bsz).

Shapes: N completions, P prompt columns, T completion columns, B rows in a micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rredcot import collectives


@dataclass(frozen=True)
class Micro:
    """One micro-batch of an optimizer step."""

    pos: torch.Tensor  # [B] positions in the step's rows (plan.rows[s]): the step's statistics buffers use them
    rows: torch.Tensor  # [B] rows of the generation batch
    p: int  # prompt columns kept: the last p
    t: int  # completion columns kept: the first t

    @property
    def tokens(self) -> int:
        """What it forwards: rows x columns (the token budget's measure, padding inside it included)."""
        return len(self.rows) * (self.p + self.t)

    def prompt(self, x: torch.Tensor) -> torch.Tensor:
        """[N, P] -> [B, p]."""
        return x[self.rows, x.shape[1] - self.p :]

    def completion(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T] -> [B, t]; a per-row [N] (GRPO's advantages) -> [B]."""
        return x[self.rows] if x.ndim == 1 else x[self.rows, : self.t]


def extents(prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per row, the prompt columns from its first real token on and the completion columns up to its last real
    one: [N, P], [N, T] -> N ints, N ints. Example: prompt mask [0, 1, 1], completion mask [1, 1, 0, 0] -> 2, 2."""
    P, T = prompt_mask.shape[1], completion_mask.shape[1]
    has_p, has_c = prompt_mask.bool(), completion_mask.bool()
    first = torch.where(has_p.any(-1), has_p.int().argmax(-1), P)  # [N]; argmax: the first maximum
    last = torch.where(has_c.any(-1), T - has_c.flip(-1).int().argmax(-1), 0)  # [N] one past the last real token
    return (P - first).tolist(), last.tolist()


def _micro(pos: list[int], step_rows: torch.Tensor, ids: list[int], pe: list[int], te: list[int]) -> Micro:
    """The micro-batch of the step's positions `pos` (ids: the step's rows as ints, read on the CPU)."""
    widest_p = max(pe[ids[i]] for i in pos)
    widest_t = max(te[ids[i]] for i in pos)
    at = torch.tensor(pos, device=step_rows.device)
    # at least one column each: the last prompt token predicts the first completion token, and an all-empty
    # micro-batch (every completion masked) still gives a [B, 1] log-prob tensor
    return Micro(at, step_rows[at], max(widest_p, 1), max(widest_t, 1))


def by_rows(step_rows: torch.Tensor, size: int, pe: list[int], te: list[int]) -> list[Micro]:
    """`size` rows at a time in the step's order (update.micro_batch_size), each trimmed."""
    ids, n = step_rows.tolist(), len(step_rows)
    return [_micro(list(range(lo, min(lo + size, n))), step_rows, ids, pe, te) for lo in range(0, n, size)]


def by_tokens(step_rows: torch.Tensor, budget: int, pe: list[int], te: list[int]) -> list[Micro]:
    """Rows longest first (prompt + completion; ties in the step's order), each micro-batch filled while rows x
    (widest prompt + widest completion) stays within `budget`; a row alone over it goes alone. Sorting puts rows
    of like length together, so little padding is forwarded. Example: lengths 10, 6, 5, 2 with budget 12 ->
    [10], [6, 5], [2] (2 x 6 = 12 fits; 3 x 6 = 18 does not)."""
    ids = step_rows.tolist()
    order = sorted(range(len(ids)), key=lambda i: -(pe[ids[i]] + te[ids[i]]))  # sorted() is stable
    out: list[list[int]] = []
    wp = wt = 0  # the open micro-batch's widest prompt and completion
    for i in order:
        p, t = max(wp, pe[ids[i]]), max(wt, te[ids[i]])
        if out and (len(out[-1]) + 1) * (p + t) <= budget:
            out[-1].append(i)
            wp, wt = p, t
        else:
            out.append([i])
            wp, wt = pe[ids[i]], te[ids[i]]
    return [_micro(pos, step_rows, ids, pe, te) for pos in out]


def matched(steps: list[list[Micro]], rows: torch.Tensor, pe: list[int], te: list[int]) -> list[list[Micro]]:
    """Every rank the same number of micro-batches in each optimizer step: the most any rank packed, reached by
    halving this rank's largest micro-batches (halves fit the budget too). rows: [spg, S], the steps' rows.

    Why: under FSDP2 and DeepSpeed ZeRO every forward gathers the weights and ZeRO-2/3 reduce gradients in
    every backward, all collectives; a rank that ran fewer passes would leave the others waiting. DDP would
    not mind (it reduces once, on the step's last backward), but one rule for every backend is safer than
    knowing each one's. Every rank holds as many rows per step (checked at config time), and no rank packs
    more micro-batches than rows, so one always has a micro-batch of two rows or more to halve. One gather per
    update (a list of spg ints); nothing on one process."""
    counts = [len(m) for m in steps]
    most = [max(c) for c in zip(*collectives.gather(counts))]
    out = []
    for s, micros in enumerate(steps):
        micros, ids = list(micros), rows[s].tolist()
        while len(micros) < most[s]:
            i = max((j for j, m in enumerate(micros) if len(m.rows) > 1), key=lambda j: micros[j].tokens)
            pos = micros[i].pos.tolist()
            half = len(pos) // 2
            micros[i : i + 1] = [_micro(part, rows[s], ids, pe, te) for part in (pos[:half], pos[half:])]
        out.append(micros)
    return out


def plan_steps(rows: torch.Tensor, cfg, pe: list[int], te: list[int]) -> list[list[Micro]]:
    """The micro-batches of every optimizer step: rows [spg, N / spg] -> spg lists (every row of step s once)."""
    budget = cfg.get("micro_batch_tokens")
    if budget is None:
        return [by_rows(r, cfg.micro_batch_size, pe, te) for r in rows]
    return matched([by_tokens(r, int(budget), pe, te) for r in rows], rows, pe, te)
