"""Monte Carlo values: the mean verified reward of M sampled continuations from each boundary (unbiased; M x
(K+1) partial generations per trace), MC at a few anchors blended with the forced values' shape, MC's own
split-half reliability, and the continuations themselves (sample_from_ids, from any rollout backend)."""

from __future__ import annotations

import torch

from rredcot.errors import UserError
from rredcot.stages.context import PolicyContext, trace_ids
from rredcot.stages.rollout import Sampling, as_backend
from rredcot.types import Rollout, Segmented, Verified


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


def mc_anchored(
    ro: Rollout,
    ver: Verified,
    seg: Segmented,
    ctx: PolicyContext,
    forced: list[torch.Tensor],
    *,
    group_size: int,
    anchors: int,
    samples: int,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Forced values corrected by Monte Carlo at `anchors` boundaries of each trace (blend_anchors): the
    level from sampling (unbiased), the within-trace shape from forcing (cheap). Costs anchors x samples
    partial generations per trace instead of MC's (K+1) x samples."""
    idx = [anchor_indices(len(b), anchors) for b in seg.boundaries]
    sub = Segmented(boundaries=[[b[i] for i in ix] for b, ix in zip(seg.boundaries, idx)], think_end=seg.think_end)
    mc, stats = mc_values(
        ro,
        ver,
        sub,
        ctx,
        group_size=group_size,
        samples=samples,
        max_new_tokens=ctx.max_new_tokens or ro.completion_ids.shape[1],
    )
    return [blend_anchors(f, ix, m) for f, ix, m in zip(forced, idx, mc)], stats


def mc_values(
    ro: Rollout,
    ver: Verified,
    seg: Segmented,
    ctx: PolicyContext,
    *,
    group_size: int,
    samples: int = 4,
    max_new_tokens: int = 0,
) -> tuple[list[torch.Tensor], dict[str, float]]:
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
    halves = [
        torch.zeros(2, len(b)) for b in seg.boundaries
    ]  # per trace: the mean reward of the even / odd continuations
    for j, (row, k, done_ids) in enumerate(owners):
        head = ctx.tokenizer.decode(done_ids, skip_special_tokens=True)
        conts = texts[j * samples : (j + 1) * samples]
        rewards = [ctx.verifier(head + c, ro.samples[row]).reward or 0.0 for c in conts]
        values[row][k] = sum(rewards) / samples
        halves[row][:, k] = torch.tensor(
            [sum(rewards[::2]) / len(rewards[::2]), sum(rewards[1::2]) / max(len(rewards[1::2]), 1)]
        )
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
    return {
        "credit/mc_split_half": spearman_brown(pearson(vals[0], vals[1])),
        "credit/mc_split_half_credit": spearman_brown(spearman(diffs[0], diffs[1])),
    }


def sample_from_ids(
    backend,
    tokenizer,
    prefixes: list[list[int]],
    n: int,
    budgets: list[int],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seeds: list[int] | None = None,
) -> list[str]:
    """`n` sampled continuations of each token prefix (Monte Carlo values); continuation j of prefix i
    is at index i * n + j and has at most budgets[i] tokens (seeds: one per continuation, prefix_seeds)."""
    backend = as_backend(backend, tokenizer)
    rows = [(p, b) for p, b in zip(prefixes, budgets) for _ in range(n)]
    device = next(backend.model.parameters()).device
    texts: list[str] = []
    for lo in range(0, len(rows), backend.chunk_size):
        chunk = rows[lo : lo + backend.chunk_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(chunk):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        keyed = {"seeds": seeds[lo : lo + backend.chunk_size]} if seeds is not None else {}
        gen = backend.generate(
            ids.to(device),
            mask.to(device),
            Sampling(max(b for _, b in chunk), temperature, top_p, top_k),
            budgets=[b for _, b in chunk],
            **keyed,
        )
        for i, (_, budget) in enumerate(chunk):
            keep = gen.ids[i, :budget][gen.mask[i, :budget].bool()]
            texts.append(tokenizer.decode(keep.tolist(), skip_special_tokens=True))
    return texts
