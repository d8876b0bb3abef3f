"""Value estimates V_hat(S_k) at every segment boundary of every trace (docs/method.md, "Estimating V").

- `forced_values`: the policy's own probability of the group's answers after answer forcing,
  weighted by their utility (the importance-sampling estimate; only forward passes).
  Variants: averaged over several forcing texts (`extra_forcings`), and Monte Carlo at a few boundaries
  with the forced values' shape in between (`mc_boundaries`, `blend_anchors`).
- `verdict_values`: the policy's own judgement of the trace so far, p(yes) / (p(yes) + p(no)) after a
  question (no answer needed, so it speaks in groups without a right answer too).
- `mc_values` (stages/montecarlo.py): the mean verified reward of M sampled continuations from each
  boundary (unbiased; costs M x (K+1) partial generations per trace).
All return, per trace, a [K+1] tensor for boundaries b_0 .. b_K.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rredcot.errors import UserError
from rredcot.stages.bank import solution_values
from rredcot.stages.context import PolicyContext, group_answers, probe_blocks, trace_ids
from rredcot.stages.montecarlo import mc_anchored
from rredcot.stages.probes import ProbeItem, score_items
from rredcot.types import Rollout, Segmented, Verified


def forced_values(
    ro: Rollout,
    ver: Verified,
    seg: Segmented,
    ctx: PolicyContext,
    *,
    group_size: int,
    answers: str = "group",
    include_reference: bool = True,
    self_normalize: bool = False,
    length_normalize: bool = False,
    extra_forcings: Sequence[Sequence[str]] = (),
    mc_boundaries: int = 0,
    mc_samples: int = 4,
    solution_weight: float = 0.0,
    bank: str = "reference",
    solution_from: str = "aligned",
    max_batch_tokens: int = 16384,
    packed_max_tokens: int = 8192,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """V_hat(S_k) = sum_a U(a) p_k(a) over the group's answers a (divided by sum_a p_k(a) when
    self_normalize), p_k(a) = pi(a + closing | prefix up to b_k + forcing text), teacher-forced.

    Example: answers {"14": U=1, "13": U=0}; at b_k p("14") = .2, p("13") = .6 -> V = .2
    (self-normalised: .2 / .8 = .25). Answers with U = 0 are not even scored unless self_normalize.
    extra_forcings: more [forcing text, closing text] pairs; V is the mean over them and the task's own
    (a trace half-way may answer one way of asking and not another). mc_boundaries > 0: Monte Carlo values
    (mc_samples continuations) at that many evenly spaced boundaries, forced values between (`blend_anchors`).
    answers="gold": only the gold answer is scored, V = p_k(gold) (GRPO-VPS's progress signal).
    solution_weight w > 0: V = (1 - w) V + w V_sol, V_sol the reference-solution bank's value
    (stages/bank.py: bank, solution_from); w = 1 scores the bank alone.
    """
    if ctx.force_text is None:
        raise UserError(
            "The rredcot estimator needs the task's forcing text, and task.forcing_text is not set. "
            "Add task.forcing_text (e.g. '\\n</think>\\n\\nThe final answer is \\\\boxed{') and "
            "task.closing_text to the task config."
        )
    forcings = [(ctx.force_text, ctx.closing_text), *[(str(f), str(c)) for f, c in extra_forcings]]
    probe = dict(
        length_normalize=length_normalize, max_batch_tokens=max_batch_tokens, packed_max_tokens=packed_max_tokens
    )
    asked = dict(answers=answers, include_reference=include_reference, self_normalize=self_normalize, **probe)
    runs = (
        []
        if solution_weight >= 1
        else [_forced_once(ro, seg, ctx, f, c, group_size=group_size, **asked) for f, c in forcings]
    )
    values = [torch.stack([vals[i] for vals, _ in runs]).mean(0) if runs else 0.0 for i in range(len(seg.boundaries))]
    tokens = sum(t for _, t in runs) / max(len(ro.texts), 1)
    stats = {"credit/probe_tokens_per_trace": tokens}
    if solution_weight > 0:
        sol, stats = solution_values(
            ro, ver, seg, ctx, group_size=group_size, bank=bank, solution_from=solution_from, **probe
        )
        values = [(1 - solution_weight) * v + solution_weight * s for v, s in zip(values, sol)]
        stats["credit/probe_tokens_per_trace"] += tokens
    if mc_boundaries > 0:
        values, mc_stats = mc_anchored(
            ro, ver, seg, ctx, values, group_size=group_size, anchors=mc_boundaries, samples=mc_samples
        )
        stats.update(mc_stats)
    return values, stats


def _forced_once(
    ro: Rollout,
    seg: Segmented,
    ctx: PolicyContext,
    force: str,
    close: str,
    *,
    group_size: int,
    answers: str,
    include_reference: bool,
    self_normalize: bool,
    length_normalize: bool,
    max_batch_tokens: int,
    packed_max_tokens: int,
) -> tuple[list[torch.Tensor], int]:
    """forced_values for one forcing text: (per trace [K+1] values, probe tokens scored)."""
    values: list[torch.Tensor] = [torch.zeros(len(b)) for b in seg.boundaries]
    items, owners, utils, lens, first = [], [], {}, {}, {}
    for g0 in range(0, len(ro.texts), group_size):
        cands = (
            [ro.samples[g0].gold.strip()]
            if answers == "gold"
            else group_answers(ro, ctx, g0, group_size, include_reference)
        )
        u = [ctx.verifier.judge(a, ro.samples[g0]) or 0.0 for a in cands]  # U(a), the verifier's own judgement
        keep = [i for i, ui in enumerate(u) if self_normalize or ui > 0]
        if not keep:
            continue  # no answer of this group is right: every V_hat is exactly 0
        blocks, starts = probe_blocks(ctx.tokenizer, force, [cands[i] + close for i in keep])
        for row in range(g0, g0 + group_size):
            ids, plen = trace_ids(ro, row)
            bounds = [plen + b for b in seg.boundaries[row]]
            if row > g0 and seg.boundaries[row][:1] == [0] == seg.boundaries[g0][:1]:
                bounds, first[row] = bounds[1:], g0  # b_0 = the prompt alone: the same probes for the whole group
            if bounds:
                items.append(ProbeItem(ids, bounds, blocks, starts, row=row))
                owners.append(row)
            utils[row] = torch.tensor([u[i] for i in keep])
            lens[row] = torch.tensor([len(b) - s for b, s in zip(blocks, starts)], dtype=torch.float)
    got = dict(zip(owners, score_items(ctx.model, items, ctx.temperature, max_batch_tokens, packed_max_tokens, ro.kv)))
    for row in utils:
        logp = got.get(row, torch.zeros(0, len(utils[row])))  # [K+1, |A|]
        if row in first:  # b_0's row, scored once on the group's first trace
            logp = torch.cat([got[first[row]][:1], logp])
        if length_normalize:
            logp = logp / lens[row]
        p = logp.exp()
        v = (p * utils[row]).sum(-1)
        values[row] = v / p.sum(-1).clamp(min=1e-12) if self_normalize else v
    return values, sum(it.probe_tokens for it in items)


def verdict_values(
    ro: Rollout,
    ver: Verified,
    seg: Segmented,
    ctx: PolicyContext,
    *,
    verdict_text: str,
    yes_text: str = "yes",
    no_text: str = "no",
    max_batch_tokens: int = 16384,
    packed_max_tokens: int = 8192,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """V_hat(S_k) = p(yes) / (p(yes) + p(no)), each teacher-forced after prefix up to b_k + verdict_text: the
    policy's own verdict on the trace so far. Example: log p(yes) = -1, log p(no) = -2 -> sigmoid(1) = .73.

    Unlike forced answers it needs no right answer in the group and reads "on track", not "answer
    written"; it is only as good as the model's habit of judging its own reasoning (a model that never
    saw the question answers noise)."""
    blocks, starts = probe_blocks(ctx.tokenizer, verdict_text, [yes_text, no_text])
    items = []
    for row, bounds in enumerate(seg.boundaries):
        ids, plen = trace_ids(ro, row)
        items.append(ProbeItem(ids, [plen + b for b in bounds], blocks, starts, row=row))
    scored = score_items(ctx.model, items, ctx.temperature, max_batch_tokens, packed_max_tokens, ro.kv)
    values = [torch.sigmoid(logp[:, 0] - logp[:, 1]) for logp in scored]  # logp [K+1, 2]
    return values, {"credit/probe_tokens_per_trace": sum(it.probe_tokens for it in items) / max(len(items), 1)}
