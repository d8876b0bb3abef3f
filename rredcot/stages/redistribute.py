"""Redistribute stage: turn each trace's verified reward into [N, T] token advantages.

Every entry has the signature (rollout, verified, segmented, ctx, *, group_size, **options) -> Credit,
where ctx (a PolicyContext) gives the current policy and the task's forcing texts.

- `uniform`: every token gets its trace's GRPO advantage. This *is* GRPO.
- `rredcot`: values from answer forcing (stages/values.py), turned into token advantages by `mode`.
- `verdict`: values from the policy's own yes/no verdict on the trace so far, turned likewise.
- `reference`: values from a bank of reference solutions, the policy's probability of writing a known
  right solution's remaining steps and its answer (stages/bank.py).
- `vps`: GRPO-VPS (arXiv 2604.20659): V = the policy's probability of the gold answer alone after each
  boundary (the same probe pass), its change the segment's progress.
- `mc`: the same with Monte Carlo values (the reference for estimator quality; expensive).
- `attention`, `gradient`: the GRPO advantage spread over segments by attribution weights.

The modes that turn values into token advantages (immediate, return_to_go, mixed, anchored, reweight) and
why `anchored` is the default: stages/token_credit.py.
"""

from __future__ import annotations

import inspect

import torch

from rredcot.advantages import group_advantages
from rredcot.ranges import COUNT, NATURAL, Rule, list_of, number, one_of
from rredcot.registry import register
from rredcot.stages.attribution import attention_weights, gradient_weights
from rredcot.stages.bank import BANKS, STARTS
from rredcot.stages.context import PolicyContext
from rredcot.stages.montecarlo import mc_values
from rredcot.stages.token_credit import MODES, SCALES, _weighted, value_credit
from rredcot.stages.values import forced_values, verdict_values
from rredcot.types import Credit, Rollout, Segmented, Verified

# The valid range of every estimator option (checked at config time).
RULES = {
    "mode": one_of(*MODES),
    "scale": one_of(*SCALES),
    "scale_rewards": one_of(*SCALES),
    "alpha": number(0),
    "sigma": one_of("softmax", "positive", "signed"),
    "tau": number(0, lo_open=True),
    "sigma_floor": number(0, 1),
    "equal_groups": one_of("keep", "zero"),
    "solution_weight": number(0, 1),
    "bank": one_of(*BANKS),
    "solution_from": one_of(*STARTS),
    "samples": COUNT,
    "max_new_tokens": NATURAL,
    "max_batch_tokens": COUNT,
    "packed_max_tokens": COUNT,
    "mc_boundaries": NATURAL,
    "mc_samples": COUNT,
    "extra_forcings": list_of(
        Rule(
            lambda v: len(v) == 2 and all(isinstance(t, str) and t for t in v),
            "a [forcing text, closing text] pair of non-empty strings",
        )
    ),
    **{
        k: Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")
        for k in ("verdict_text", "yes_text", "no_text")
    },
}


@register("redistribute", "uniform", RULES, label="grpo")
def uniform(
    ro: Rollout,
    ver: Verified,
    seg: Segmented,
    ctx: PolicyContext | None = None,
    *,
    group_size: int,
    scale_rewards: str = "group",
) -> Credit:
    """GRPO: A_i on every token of completion i. advantages [N, T] = A [N, 1] * mask [N, T]."""
    adv = group_advantages(ver.rewards, group_size, scale=scale_rewards).to(ro.completion_mask.device)  # [N]
    per_seg = [adv[i].cpu().repeat(len(b)) for i, b in enumerate(seg.boundaries)]
    return Credit(advantages=adv[:, None] * ro.completion_mask, valid=~torch.isnan(ver.rewards), segment_credit=per_seg)


@register("redistribute", "rredcot", RULES, needs_task_keys=("forcing_text",), reads_kv=True)
def rredcot(
    ro,
    ver,
    seg,
    ctx,
    *,
    group_size: int,
    mode: str = "anchored",
    scale: str = "group",
    alpha: float = 1.0,
    scale_rewards: str = "group",
    equal_groups: str = "keep",
    sigma: str = "softmax",
    tau: float = 0.25,
    sigma_floor: float = 0.0,
    include_reference: bool = True,
    self_normalize: bool = False,
    length_normalize: bool = False,
    extra_forcings=(),
    mc_boundaries: int = 0,
    mc_samples: int = 4,
    solution_weight: float = 0.0,
    bank: str = "reference",
    solution_from: str = "aligned",
    max_batch_tokens: int = 16384,
    packed_max_tokens: int = 8192,
) -> Credit:
    """RREDCoT: values by answer forcing with the policy itself, no extra generation (unless mc_boundaries);
    solution_weight > 0 mixes in the reference-solution bank's value (stages/bank.py)."""
    values, stats = forced_values(
        ro,
        ver,
        seg,
        ctx,
        group_size=group_size,
        include_reference=include_reference,
        self_normalize=self_normalize,
        length_normalize=length_normalize,
        extra_forcings=extra_forcings,
        mc_boundaries=mc_boundaries,
        mc_samples=mc_samples,
        solution_weight=solution_weight,
        bank=bank,
        solution_from=solution_from,
        max_batch_tokens=max_batch_tokens,
        packed_max_tokens=packed_max_tokens,
    )
    modes = dict(mode=mode, scale=scale, alpha=alpha, scale_rewards=scale_rewards, equal_groups=equal_groups)
    return _credit(ro, ver, seg, values, stats, group_size, **modes, sigma=sigma, tau=tau, sigma_floor=sigma_floor)


def _credit(ro, ver, seg, values, stats: dict[str, float], group_size: int, **mode_options) -> Credit:
    """The value estimators' common end: token advantages by `mode` (stages/token_credit.py), their stats."""
    credit = value_credit(ro, ver, seg, values, group_size=group_size, **mode_options)
    credit.stats.update(stats)
    return credit


def reference(ro, ver, seg, ctx, **options) -> Credit:
    """Reference-solution bank: V = pi(the remaining reference steps, then the gold answer | prefix): the
    rredcot estimator with solution_weight=1 (lower it to mix in the group's forced answers)."""
    return rredcot(ro, ver, seg, ctx, **{"solution_weight": 1.0, **options})


# rredcot's options with solution_weight=1: the config check and `rredcot list` read the signature
reference.__signature__ = inspect.signature(rredcot).replace(
    parameters=[
        p.replace(default=1.0) if p.name == "solution_weight" else p
        for p in inspect.signature(rredcot).parameters.values()
    ]
)
register("redistribute", "reference", RULES, needs_task_keys=("forcing_text",), reads_kv=True)(reference)


@register("redistribute", "vps", RULES, needs_task_keys=("forcing_text",), reads_kv=True)
def vps(
    ro,
    ver,
    seg,
    ctx,
    *,
    group_size: int,
    mode: str = "mixed",
    scale: str = "group",
    alpha: float = 1.0,
    scale_rewards: str = "group",
    equal_groups: str = "keep",
    sigma: str = "softmax",
    tau: float = 0.25,
    sigma_floor: float = 0.0,
    max_batch_tokens: int = 16384,
    packed_max_tokens: int = 8192,
) -> Credit:
    """GRPO-VPS: V_k = p(gold answer | prefix up to b_k, forcing text), one packed probe pass, no sampling; the
    default mode adds its change (the segment's progress) to GRPO's advantage (mixed)."""
    values, stats = forced_values(
        ro,
        ver,
        seg,
        ctx,
        group_size=group_size,
        answers="gold",
        max_batch_tokens=max_batch_tokens,
        packed_max_tokens=packed_max_tokens,
    )
    modes = dict(mode=mode, scale=scale, alpha=alpha, scale_rewards=scale_rewards, equal_groups=equal_groups)
    return _credit(ro, ver, seg, values, stats, group_size, **modes, sigma=sigma, tau=tau, sigma_floor=sigma_floor)


@register("redistribute", "verdict", RULES, reads_kv=True)
def verdict(
    ro,
    ver,
    seg,
    ctx,
    *,
    group_size: int,
    verdict_text: str,
    yes_text: str = "yes",
    no_text: str = "no",
    mode: str = "anchored",
    scale: str = "group",
    alpha: float = 1.0,
    scale_rewards: str = "group",
    equal_groups: str = "keep",
    sigma: str = "softmax",
    tau: float = 0.25,
    sigma_floor: float = 0.0,
    max_batch_tokens: int = 16384,
    packed_max_tokens: int = 8192,
) -> Credit:
    """Values from the policy's own verdict on the trace so far (stages/values.verdict_values)."""
    values, stats = verdict_values(
        ro,
        ver,
        seg,
        ctx,
        verdict_text=verdict_text,
        yes_text=yes_text,
        no_text=no_text,
        max_batch_tokens=max_batch_tokens,
        packed_max_tokens=packed_max_tokens,
    )
    modes = dict(mode=mode, scale=scale, alpha=alpha, scale_rewards=scale_rewards, equal_groups=equal_groups)
    return _credit(ro, ver, seg, values, stats, group_size, **modes, sigma=sigma, tau=tau, sigma_floor=sigma_floor)


@register("redistribute", "mc", RULES)
def mc(
    ro,
    ver,
    seg,
    ctx,
    *,
    group_size: int,
    samples: int = 4,
    max_new_tokens: int = 0,
    mode: str = "return_to_go",
    scale: str = "group",
    alpha: float = 1.0,
    scale_rewards: str = "group",
    equal_groups: str = "keep",
    sigma: str = "softmax",
    tau: float = 0.25,
    sigma_floor: float = 0.0,
) -> Credit:
    """Monte Carlo values (VinePPO-style): `samples` continuations from every boundary."""
    values, stats = mc_values(
        ro,
        ver,
        seg,
        ctx,
        group_size=group_size,
        samples=samples,
        max_new_tokens=max_new_tokens or ctx.max_new_tokens or ro.completion_ids.shape[1],
    )
    modes = dict(mode=mode, scale=scale, alpha=alpha, scale_rewards=scale_rewards, equal_groups=equal_groups)
    return _credit(ro, ver, seg, values, stats, group_size, **modes, sigma=sigma, tau=tau, sigma_floor=sigma_floor)


@register("redistribute", "attention", RULES)
def attention(ro, ver, seg, ctx, *, group_size: int, scale_rewards: str = "group") -> Credit:
    """Dense reward from the attention the answer pays to each segment."""
    return _weighted(ro, ver, seg, attention_weights(ro, seg, ctx), group_size, scale_rewards)


@register("redistribute", "gradient", RULES, needs_task_keys=("forcing_text",), runs_backward=True)
def gradient(ro, ver, seg, ctx, *, group_size: int, scale_rewards: str = "group") -> Credit:
    """The GRPO advantage spread by gradient x input attribution of log p(gold answer)."""
    return _weighted(ro, ver, seg, gradient_weights(ro, seg, ctx), group_size, scale_rewards)
