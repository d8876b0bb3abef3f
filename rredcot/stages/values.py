"""Value estimates V_hat(S_k) at every segment boundary of every trace (docs/method.md, "Estimating V").

- `forced_values`: the policy's own probability of the group's answers after answer forcing,
  weighted by their utility (the importance-sampling estimate; only forward passes).
- `mc_values`: the mean verified reward of M sampled continuations from each boundary (unbiased;
  costs M x (K+1) partial generations per trace).
Both return, per trace, a [K+1] tensor for boundaries b_0 .. b_K.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from rredcot.errors import UserError
from rredcot.stages.probes import ProbeItem, score_items
from rredcot.types import Rollout, Segmented, Verified


@dataclass
class PolicyContext:
    """What value estimators may use besides the batch: the current policy and the task's texts."""

    model: Any
    tokenizer: Any
    verifier: Any  # the task's Verifier: extract(completion), judge(answer, sample), (completion, sample) -> Score
    force_text: str | None  # appended at a boundary to ask for the answer (task.forcing_text)
    closing_text: str  # follows the answer (task.closing_text)
    generate: Callable | None = None  # (prefix id lists, n, budgets) -> texts, for Monte Carlo
    temperature: float = 1.0  # the sampling temperature: probes score the policy that samples (as the update does)
    max_new_tokens: int = 0  # the rollout's completion budget (Monte Carlo continuations share it)


def _encode(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def probe_blocks(tok, force_text: str, texts: list[str]) -> tuple[list[torch.Tensor], list[int]]:
    """Per text (an answer plus the closing text): the forcing text and it tokenized together, as the model
    would see them, and how many leading tokens it shares with the forcing text alone (not scored).

    Example (byte-level BPE): force "\\boxed{", text "\\frac12}" may give [\\, boxed, {\\, frac, 12, }]
    where the forcing text alone is [\\, boxed, {]: 2 shared tokens, and `{\\` is scored with the answer."""
    force = _encode(tok, force_text).tolist()
    blocks, starts = [], []
    for text in texts:
        joint = _encode(tok, force_text + text)
        k = 0
        while k < min(len(force), len(joint) - 1) and joint[k] == force[k]:
            k += 1
        blocks.append(joint)
        starts.append(k)
    return blocks, starts


def trace_ids(ro: Rollout, row: int) -> tuple[torch.Tensor, int]:
    """(prompt without padding + completion without padding [L], prompt length)."""
    prompt = ro.prompt_ids[row][ro.prompt_mask[row].bool()]
    n = int(ro.completion_mask[row].sum())
    return torch.cat([prompt, ro.completion_ids[row, :n]]).cpu(), len(prompt)


def group_answers(ro: Rollout, ctx: PolicyContext, g0: int, group_size: int, include_reference: bool) -> list[str]:
    """Distinct final answers of one group (in order of appearance), plus the gold if asked."""
    seen: list[str] = []
    for text in ro.texts[g0 : g0 + group_size]:
        a = ctx.verifier.extract(text)[0]
        if a is not None and a.strip() and a.strip() not in seen:
            seen.append(a.strip())
    gold = ro.samples[g0].gold.strip()
    if include_reference and gold and gold not in seen:
        seen.append(gold)
    return seen


def forced_values(ro: Rollout, ver: Verified, seg: Segmented, ctx: PolicyContext, *, group_size: int,
                  include_reference: bool = True, self_normalize: bool = False, length_normalize: bool = False,
                  max_batch_tokens: int = 16384, packed_max_tokens: int = 8192) -> tuple[list[torch.Tensor], dict[str, float]]:
    """V_hat(S_k) = sum_a U(a) p_k(a) over the group's answers a (divided by sum_a p_k(a) when
    self_normalize), p_k(a) = pi(a + closing | prefix up to b_k + forcing text), teacher-forced.

    Example: answers {"14": U=1, "13": U=0}; at b_k p("14") = .2, p("13") = .6 -> V = .2
    (self-normalised: .2 / .8 = .25). Answers with U = 0 are not even scored unless self_normalize.
    """
    if ctx.force_text is None:
        raise UserError("The rredcot estimator needs the task's forcing text, and task.forcing_text is not set. "
                        "Add task.forcing_text (e.g. '\\n</think>\\n\\nThe final answer is \\\\boxed{') and "
                        "task.closing_text to the task config.")
    N = len(ro.texts)
    values: list[torch.Tensor] = [torch.zeros(len(b)) for b in seg.boundaries]
    items, owners, utils, lens = [], [], {}, {}
    for g0 in range(0, N, group_size):
        answers = group_answers(ro, ctx, g0, group_size, include_reference)
        u = [ctx.verifier.judge(a, ro.samples[g0]) or 0.0 for a in answers]  # U(a), the verifier's own judgement
        keep = [i for i, ui in enumerate(u) if self_normalize or ui > 0]
        if not keep:
            continue  # no answer of this group is right: every V_hat is exactly 0
        blocks, starts = probe_blocks(ctx.tokenizer, ctx.force_text, [answers[i] + ctx.closing_text for i in keep])
        for row in range(g0, g0 + group_size):
            ids, plen = trace_ids(ro, row)
            items.append(ProbeItem(ids, [plen + b for b in seg.boundaries[row]], blocks, starts))
            owners.append(row)
            utils[row] = torch.tensor([u[i] for i in keep])
            lens[row] = torch.tensor([len(b) - s for b, s in zip(blocks, starts)], dtype=torch.float)
    scored = score_items(ctx.model, items, ctx.temperature, max_batch_tokens, packed_max_tokens)
    for row, logp in zip(owners, scored):  # logp [K+1, |A|]
        if length_normalize:
            logp = logp / lens[row]
        p = logp.exp()
        v = (p * utils[row]).sum(-1)
        values[row] = v / p.sum(-1).clamp(min=1e-12) if self_normalize else v
    probe_tokens = sum(it.probe_tokens for it in items)
    return values, {"credit/probe_tokens_per_trace": probe_tokens / max(N, 1)}


def mc_values(ro: Rollout, ver: Verified, seg: Segmented, ctx: PolicyContext, *, group_size: int, samples: int = 4,
              max_new_tokens: int = 0) -> tuple[list[torch.Tensor], dict[str, float]]:
    """V_hat(S_k) = mean reward of `samples` continuations sampled from the prefix up to b_k.

    Each continuation may use the completion's remaining budget (max_new_tokens - b_k).
    """
    if ctx.generate is None:
        raise UserError("The mc estimator needs a rollout stage to sample continuations.")
    prefixes, budgets, owners = [], [], []
    for row, bounds in enumerate(seg.boundaries):
        ids, plen = trace_ids(ro, row)
        for k, b in enumerate(bounds):
            prefixes.append(ids[: plen + b].tolist())
            budgets.append(max(max_new_tokens - b, 1))
            owners.append((row, k, ids[plen : plen + b].tolist()))
    texts = ctx.generate(prefixes, samples, budgets)  # len(prefixes) * samples continuations
    values = [torch.zeros(len(b)) for b in seg.boundaries]
    halves = torch.zeros(len(owners), 2)  # the mean reward of the even and of the odd continuations
    for j, (row, k, done_ids) in enumerate(owners):
        head = ctx.tokenizer.decode(done_ids, skip_special_tokens=True)
        conts = texts[j * samples : (j + 1) * samples]
        rewards = [ctx.verifier(head + c, ro.samples[row]).reward or 0.0 for c in conts]
        values[row][k] = sum(rewards) / samples
        halves[j] = torch.tensor([sum(rewards[::2]) / len(rewards[::2]), sum(rewards[1::2]) / max(len(rewards[1::2]), 1)])
    stats = {"credit/mc_continuations_per_trace": len(prefixes) * samples / max(len(seg.boundaries), 1)}
    if samples >= 2:  # how far MC agrees with itself: the ceiling of any estimator's agreement with it
        from rredcot.correlation import pearson, spearman_brown

        stats["credit/mc_split_half"] = spearman_brown(pearson(halves[:, 0], halves[:, 1]))
    return values, stats
