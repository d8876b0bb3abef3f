"""Value estimates V_hat(S_k) at every segment boundary of every trace (docs/method.md, "Estimating V").

- `forced_values`: the policy's own probability of the group's answers after answer forcing,
  weighted by their utility (the importance-sampling estimate; only forward passes).
  Variants: averaged over several forcing texts (`extra_forcings`), and Monte Carlo at a few boundaries
  with the forced values' shape in between (`mc_boundaries`, `blend_anchors`).
- `verdict_values`: the policy's own judgement of the trace so far, p(yes) / (p(yes) + p(no)) after a
  question (no answer needed, so it speaks in groups without a right answer too).
- `mc_values`: the mean verified reward of M sampled continuations from each boundary (unbiased;
  costs M x (K+1) partial generations per trace).
All return, per trace, a [K+1] tensor for boundaries b_0 .. b_K.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
    generate: Callable | None = None  # (prefix id lists, n, budgets) -> texts, for Monte Carlo (keyed by the RL step)
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
                  extra_forcings: Sequence[Sequence[str]] = (), mc_boundaries: int = 0, mc_samples: int = 4,
                  max_batch_tokens: int = 16384, packed_max_tokens: int = 8192) -> tuple[list[torch.Tensor], dict[str, float]]:
    """V_hat(S_k) = sum_a U(a) p_k(a) over the group's answers a (divided by sum_a p_k(a) when
    self_normalize), p_k(a) = pi(a + closing | prefix up to b_k + forcing text), teacher-forced.

    Example: answers {"14": U=1, "13": U=0}; at b_k p("14") = .2, p("13") = .6 -> V = .2
    (self-normalised: .2 / .8 = .25). Answers with U = 0 are not even scored unless self_normalize.
    extra_forcings: more [forcing text, closing text] pairs; V is the mean over them and the task's own
    (a trace half-way may answer one way of asking and not another). mc_boundaries > 0: Monte Carlo values
    (mc_samples continuations) at that many evenly spaced boundaries, forced values between (`blend_anchors`).
    """
    if ctx.force_text is None:
        raise UserError("The rredcot estimator needs the task's forcing text, and task.forcing_text is not set. "
                        "Add task.forcing_text (e.g. '\\n</think>\\n\\nThe final answer is \\\\boxed{') and "
                        "task.closing_text to the task config.")
    forcings = [(ctx.force_text, ctx.closing_text), *[(str(f), str(c)) for f, c in extra_forcings]]
    runs = [_forced_once(ro, seg, ctx, force, close, group_size=group_size, include_reference=include_reference,
                         self_normalize=self_normalize, length_normalize=length_normalize,
                         max_batch_tokens=max_batch_tokens, packed_max_tokens=packed_max_tokens) for force, close in forcings]
    values = [torch.stack([vals[i] for vals, _ in runs]).mean(0) for i in range(len(seg.boundaries))]
    stats = {"credit/probe_tokens_per_trace": sum(t for _, t in runs) / max(len(ro.texts), 1)}
    if mc_boundaries > 0:
        values, mc_stats = mc_anchored(ro, ver, seg, ctx, values, group_size=group_size, anchors=mc_boundaries,
                                       samples=mc_samples)
        stats.update(mc_stats)
    return values, stats


def _forced_once(ro: Rollout, seg: Segmented, ctx: PolicyContext, force: str, close: str, *, group_size: int,
                 include_reference: bool, self_normalize: bool, length_normalize: bool, max_batch_tokens: int,
                 packed_max_tokens: int) -> tuple[list[torch.Tensor], int]:
    """forced_values for one forcing text: (per trace [K+1] values, probe tokens scored)."""
    values: list[torch.Tensor] = [torch.zeros(len(b)) for b in seg.boundaries]
    items, owners, utils, lens = [], [], {}, {}
    for g0 in range(0, len(ro.texts), group_size):
        answers = group_answers(ro, ctx, g0, group_size, include_reference)
        u = [ctx.verifier.judge(a, ro.samples[g0]) or 0.0 for a in answers]  # U(a), the verifier's own judgement
        keep = [i for i, ui in enumerate(u) if self_normalize or ui > 0]
        if not keep:
            continue  # no answer of this group is right: every V_hat is exactly 0
        blocks, starts = probe_blocks(ctx.tokenizer, force, [answers[i] + close for i in keep])
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
    return values, sum(it.probe_tokens for it in items)


def verdict_values(ro: Rollout, ver: Verified, seg: Segmented, ctx: PolicyContext, *, verdict_text: str,
                   yes_text: str = "yes", no_text: str = "no", max_batch_tokens: int = 16384,
                   packed_max_tokens: int = 8192) -> tuple[list[torch.Tensor], dict[str, float]]:
    """V_hat(S_k) = p(yes) / (p(yes) + p(no)), each teacher-forced after prefix up to b_k + verdict_text: the
    policy's own verdict on the trace so far. Example: log p(yes) = -1, log p(no) = -2 -> sigmoid(1) = .73.

    Unlike forced answers it needs no right answer in the group and reads "on track", not "answer
    written"; it is only as good as the model's habit of judging its own reasoning (a model that never
    saw the question answers noise)."""
    blocks, starts = probe_blocks(ctx.tokenizer, verdict_text, [yes_text, no_text])
    items = []
    for row, bounds in enumerate(seg.boundaries):
        ids, plen = trace_ids(ro, row)
        items.append(ProbeItem(ids, [plen + b for b in bounds], blocks, starts))
    scored = score_items(ctx.model, items, ctx.temperature, max_batch_tokens, packed_max_tokens)
    values = [torch.sigmoid(logp[:, 0] - logp[:, 1]) for logp in scored]  # logp [K+1, 2]
    return values, {"credit/probe_tokens_per_trace": sum(it.probe_tokens for it in items) / max(len(items), 1)}


def anchor_indices(n_bounds: int, anchors: int) -> list[int]:
    """`anchors` evenly spaced boundary indices out of 0..n_bounds-1, the first and last included.
    Example: 7 boundaries, 3 anchors -> [0, 3, 6]; 1 anchor -> [0]; more anchors than boundaries -> all."""
    if anchors >= n_bounds:
        return list(range(n_bounds))
    if anchors == 1:
        return [0]
    return sorted({round(i * (n_bounds - 1) / (anchors - 1)) for i in range(anchors)})


def blend_anchors(forced: torch.Tensor, idx: list[int], mc: torch.Tensor) -> torch.Tensor:
    """[K+1] values: Monte Carlo levels at the anchor boundaries `idx`, the forced values' shape between.

    Between anchors a < c, with w = (k - a) / (c - a) and lerp(x) = x_a + w (x_c - x_a):
    V_k = lerp(mc) + F_k - lerp(F), clamped to [0, 1]; after the last anchor (one anchor only) the forced
    values are shifted by mc - F there. Example: F = [0, .1, 0, .6, 1], idx [0, 4], mc [.4, 1]:
    lerp(mc) = [.4, .55, .7, .85, 1], lerp(F) = [0, .25, .5, .75, 1] -> [.4, .4, .2, .7, 1].
    """
    out = forced.clone()
    mc = mc.to(forced.dtype)
    for j, (a, c) in enumerate(zip(idx, idx[1:])):
        w = torch.arange(c - a + 1, dtype=forced.dtype) / (c - a)
        out[a : c + 1] = mc[j] + w * (mc[j + 1] - mc[j]) + forced[a : c + 1] - (forced[a] + w * (forced[c] - forced[a]))
    out[idx[-1] :] = forced[idx[-1] :] + (mc[-1] - forced[idx[-1]])
    return out.clamp(0, 1)


def mc_anchored(ro: Rollout, ver: Verified, seg: Segmented, ctx: PolicyContext, forced: list[torch.Tensor], *,
                group_size: int, anchors: int, samples: int) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Forced values corrected by Monte Carlo at `anchors` boundaries of each trace (blend_anchors): the
    level from sampling (unbiased), the within-trace shape from forcing (cheap). Costs anchors x samples
    partial generations per trace instead of MC's (K+1) x samples."""
    idx = [anchor_indices(len(b), anchors) for b in seg.boundaries]
    sub = Segmented(boundaries=[[b[i] for i in ix] for b, ix in zip(seg.boundaries, idx)], think_end=seg.think_end)
    mc, stats = mc_values(ro, ver, sub, ctx, group_size=group_size, samples=samples,
                          max_new_tokens=ctx.max_new_tokens or ro.completion_ids.shape[1])
    return [blend_anchors(f, ix, m) for f, ix, m in zip(forced, idx, mc)], stats


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
    halves = [torch.zeros(2, len(b)) for b in seg.boundaries]  # per trace: the mean reward of the even / odd continuations
    for j, (row, k, done_ids) in enumerate(owners):
        head = ctx.tokenizer.decode(done_ids, skip_special_tokens=True)
        conts = texts[j * samples : (j + 1) * samples]
        rewards = [ctx.verifier(head + c, ro.samples[row]).reward or 0.0 for c in conts]
        values[row][k] = sum(rewards) / samples
        halves[row][:, k] = torch.tensor([sum(rewards[::2]) / len(rewards[::2]), sum(rewards[1::2]) / max(len(rewards[1::2]), 1)])
    stats = {"credit/mc_continuations_per_trace": len(prefixes) * samples / max(len(seg.boundaries), 1)}
    if samples >= 2:
        stats.update(split_half(halves))
    return values, stats


def split_half(halves: list[torch.Tensor]) -> dict[str, float]:
    """How far Monte Carlo agrees with itself, from per-trace [2, K+1] values of its even and odd samples:
    the ceiling of any estimator's agreement with it. Values: Pearson of the halves, Spearman-Brown
    corrected. Credit (V_k - V_(k-1), what training uses): Spearman of the halves' differences, likewise;
    differences of noisy values are much noisier than the values, so this ceiling is the lower one.
    Example: halves' credits [.5, 0, -.5] and [.5, .5, -.5] -> Spearman .87 -> 2(.87)/(1.87) = .93."""
    from rredcot.correlation import pearson, spearman, spearman_brown

    vals = torch.cat([h for h in halves], dim=1)  # [2, all boundaries]
    diffs = torch.cat([h[:, 1:] - h[:, :-1] for h in halves], dim=1)  # [2, all segments]
    return {"credit/mc_split_half": spearman_brown(pearson(vals[0], vals[1])),
            "credit/mc_split_half_credit": spearman_brown(spearman(diffs[0], diffs[1]))}
