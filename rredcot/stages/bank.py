"""The reference-solution value estimate: how likely the policy is, from each boundary, to write a known
right solution and then its answer (docs/method.md, "A bank of reference solutions").

    V_sol(S_k) = sum over bank items (u, y) of U(y) * pi(u + forcing text + y + closing | S_k)

A secondary account of the paper writes v(s_t) = (1/N) sum_(u,y) p(y | u, s_t) p(u | s_t) U(y) over a bank
of N (solution, answer) pairs; we sum instead of averaging (each item is a distinct continuation, so the
sum is the probability mass the bank covers: a lower bound of the value, exact when the bank holds every
right continuation). The bank of a prompt is its task's reference solution (Sample.meta["solution"]) and,
with bank="both" or "group", the thinking part of its group's right traces.

Which continuation u a bank item offers after boundary k (`solution_from`):
  aligned  the solution's steps (lines) after the ones the prefix has written: after 2 lines of a 5-line
           reference, its lines 3-5. With none left, u is the forcing text alone (the forced-answer probe,
           whose own probability is left out, as the estimator the paper generalises).
  start    the whole solution, whatever the prefix (the formula read literally).
The forcing text after a complete u is scored with it: after a finished solution the end-of-thinking marker
is the natural next text, after a partial trace it is not (why forced answers leave it out).
Log-probabilities are summed in float64 before exp, so a long u underflows only below 1e-308.
"""

from __future__ import annotations

import torch

from rredcot.stages.context import PolicyContext, _encode, probe_blocks, trace_ids
from rredcot.stages.probes import ProbeItem, score_items
from rredcot.task.arith import THINK_CLOSE, THINK_OPEN
from rredcot.types import Rollout, Segmented, Verified

BANKS = ("reference", "group", "both")
STARTS = ("aligned", "start")


def solution_lines(text: str) -> list[str]:
    """A solution's steps: its non-empty lines, without think markers.
    Example: '<think>\\na=1\\n\\nb=2\\n</think>\\n2' -> ['a=1', 'b=2', '2'] (an answer line after the marker
    counts: solutions in the bank are thinking text, so tasks store them without the answer part)."""
    return [ln for ln in text.split("\n") if ln.strip() and ln.strip() not in (THINK_OPEN, THINK_CLOSE)]


def thinking_part(text: str, marker: str | None = THINK_CLOSE) -> str:
    """A completion's text before its last end-of-thinking marker (the whole text without one)."""
    at = text.rfind(marker) if marker else -1
    return text[:at] if at >= 0 else text


def bank_for(ro: Rollout, ver: Verified, g0: int, group_size: int, bank: str) -> list[list[str]]:
    """The bank of one group: per item, its solution steps. The reference first (where the task has one),
    then the distinct thinking parts of the group's right traces (bank "group" / "both")."""
    items: list[list[str]] = []
    ref = ro.samples[g0].meta.get("solution")
    if bank in ("reference", "both") and ref:
        items.append(solution_lines(str(ref)))
    if bank in ("group", "both"):
        for row in range(g0, g0 + group_size):
            if bool(ver.correct[row]):
                steps = solution_lines(thinking_part(ro.texts[row]))
                if steps and steps not in items:
                    items.append(steps)
    return [s for s in items if s]


def lines_written(tokenizer, completion: list[int], b: int) -> int:
    """Complete steps in the first b completion tokens: non-empty lines ended by a line break."""
    text = tokenizer.decode(completion[:b], skip_special_tokens=True)
    return len(solution_lines(text[: text.rfind("\n") + 1])) if "\n" in text else 0


def _blocks(tok, force: str, tail: str, steps: list[str]) -> tuple[torch.Tensor, int]:
    """One probe: u + forcing text + answer tail tokenized together, all scored; with no steps left the
    forced-answer probe (forcing text's own tokens not scored)."""
    if not steps:
        blocks, starts = probe_blocks(tok, force, [tail])
        return blocks[0], starts[0]
    return _encode(tok, "\n".join(steps) + "\n" + force + tail), 0


def solution_values(
    ro: Rollout,
    ver: Verified,
    seg: Segmented,
    ctx: PolicyContext,
    *,
    group_size: int,
    bank: str = "reference",
    solution_from: str = "aligned",
    length_normalize: bool = False,
    max_batch_tokens: int = 16384,
    packed_max_tokens: int = 8192,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Per trace [K+1] V_sol at b_0..b_K; 0 for a group whose bank is empty (stats say how often)."""
    values = [torch.zeros(len(b)) for b in seg.boundaries]
    items, owners, lens, covered = [], [], {}, 0
    for g0 in range(0, len(ro.texts), group_size):
        sols = bank_for(ro, ver, g0, group_size, bank)
        gold = ro.samples[g0].gold.strip()
        if not sols or not (ctx.verifier.judge(gold, ro.samples[g0]) or 0.0) > 0:
            continue
        covered += 1
        tail = gold + ctx.closing_text
        for row in range(g0, g0 + group_size):
            ids, plen = trace_ids(ro, row)
            completion = ids[plen:].tolist()
            own = []
            for b in seg.boundaries[row]:
                done = lines_written(ctx.tokenizer, completion, b) if solution_from == "aligned" else 0
                own.append([_blocks(ctx.tokenizer, ctx.force_text, tail, s[done:]) for s in sols])
            items.append(ProbeItem(ids, [plen + b for b in seg.boundaries[row]], [], [], own=own, row=row))
            owners.append(row)
            lens[row] = torch.tensor([[len(blk) - s0 for blk, s0 in probes] for probes in own], dtype=torch.float64)
    scored = score_items(ctx.model, items, ctx.temperature, max_batch_tokens, packed_max_tokens, ro.kv)
    for row, logp in zip(owners, scored):  # logp [K+1, |bank|]
        logp = logp.double() / lens[row] if length_normalize else logp.double()
        values[row] = logp.exp().sum(-1).clamp(max=1.0).float()
    groups = max(len(ro.texts) // group_size, 1)
    stats = {
        "credit/bank_groups_frac": covered / groups,
        "credit/probe_tokens_per_trace": sum(it.probe_tokens for it in items) / max(len(ro.texts), 1),
    }
    return values, stats
