"""From segment values (or segment weights) to [N, T] token advantages: the modes of the value estimators
(`value_credit`), and GRPO's advantage re-weighted inside each trace by per-segment coefficients sigma
(`sigma_weighted`: mode=reweight's sigma from the credits, the attribution estimators' from their weights).

Modes (docs/method.md, "From values to token advantages"), with r_k = V_k - V_(k-1) and the correction
r_(K+1) = R - V_K:
  immediate     segment k gets r_k                      (RUDDER)
  return_to_go  segment k gets R - V_(k-1)              (state-dependent baseline, as VinePPO; biased here: below)
  mixed         the GRPO advantage + alpha * r_k / std(r over the batch)
  anchored      segment k gets R - B_(k-1), B_k = V_k + (1 - V_k) * m, m the group's mean reward (the default)
  reweight      the GRPO advantage times sigma_k (reweight_sigma), the trace's total weight kept
Tokens after b_K (marker and answer) get the correction in all modes but mixed and reweight.

Why `anchored`: forced values are a lower bound (the chance that the answer is already settled and right),
~0 until the last step computes the answer, so return_to_go gives early segments R - 0 = R: no baseline,
more variance than GRPO. B_k reads V_k as "settled right with probability V_k, otherwise the prior chance
m", so B_0 ~ m is GRPO's group mean, and with V = 0 everywhere anchored *is* GRPO (scale=group).

Shapes: N traces, T completion tokens, K segments per trace (boundaries b_0 = 0 < ... < b_K).
"""

from __future__ import annotations

import torch

from rredcot import collectives
from rredcot.advantages import credit_scale, credit_stats, equal_reward_groups, group_advantages, group_mean
from rredcot.types import Credit, Rollout, Segmented, Verified

MODES = ("immediate", "return_to_go", "mixed", "anchored", "reweight")
SCALES = ("group", "batch", "none")


def segment_rewards(values: torch.Tensor, reward: float | torch.Tensor) -> torch.Tensor:
    """values [K+1] = V_hat at b_0..b_K -> [K+1]: r_1..r_K, then the correction r_(K+1) = R - V_K.

    They sum to R - V_0 (return-equivalence). Example: V = [.2, .5, .4], R = 1 -> [.3, -.1, .6].
    """
    return torch.cat([values[1:] - values[:-1], torch.as_tensor(reward, dtype=values.dtype).view(1) - values[-1:]])


def _spread(per_segment: torch.Tensor, bounds: list[int], length: int, T: int) -> torch.Tensor:
    """[K+1] values (segments, then the correction) -> [T] per token; 0 on padding."""
    out = torch.zeros(T)
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        out[a:b] = per_segment[k]
    out[bounds[-1] : length] = per_segment[-1]
    return out


def value_credit(
    ro: Rollout,
    ver: Verified,
    seg: Segmented,
    values: list[torch.Tensor],
    *,
    group_size: int,
    mode: str = "return_to_go",
    scale: str = "group",
    alpha: float = 1.0,
    scale_rewards: str = "group",
    equal_groups: str = "keep",
    sigma: str = "softmax",
    tau: float = 0.25,
    sigma_floor: float = 0.0,
    eps: float = 1e-4,
) -> Credit:
    """Token advantages [N, T] from boundary values, by `mode` and `scale`, plus the credit statistics.

    equal_groups="zero": groups whose traces all got the same reward get no credit, as in GRPO (with
    return_to_go an all-right group otherwise gets 1 - V ~ 1 on every token: a push with no baseline).
    mode="reweight": GRPO's advantage (scale_rewards) times sigma_k (reweight_sigma: sigma, tau, sigma_floor,
    alpha for sigma="signed"); `scale` and `equal_groups` do not apply (GRPO's own scaling is kept)."""
    if mode not in MODES or scale not in SCALES:  # config rules reject these first; this guards direct callers
        raise ValueError(f"mode must be one of {MODES} and scale one of {SCALES}, got {mode!r}, {scale!r}")
    N, T = ro.completion_ids.shape
    valid = ~torch.isnan(ver.rewards)
    R = torch.nan_to_num(ver.rewards, nan=0.0)
    lengths = ro.lengths.tolist()
    seg_r = [segment_rewards(v, R[i]) for i, v in enumerate(values)]  # per trace [K+1]
    if mode == "reweight":
        A = group_advantages(ver.rewards, group_size, scale=scale_rewards)  # [N]
        sigmas = [
            reweight_sigma(
                r, float(A[i]), seg.boundaries[i], lengths[i], how=sigma, tau=tau, floor=sigma_floor, alpha=alpha
            )
            for i, r in enumerate(seg_r)
        ]
        adv = sigma_weighted(ro, seg, A, sigmas) * valid[:, None]
        stats = {**credit_stats(seg_r, values, ver), **sigma_stats(sigmas)}
        return Credit(adv.to(ro.completion_ids.device), valid, stats, segment_credit=seg_r, values=values)
    per_seg = _per_segment(mode, values, seg_r, ver, group_size, alpha, scale_rewards)
    adv = torch.stack([_spread(p, seg.boundaries[i], lengths[i], T) for i, p in enumerate(per_seg)])  # [N, T]
    if mode != "mixed":
        if scale == "group":
            adv = adv / (credit_scale(ver.rewards, group_size)[:, None] + eps)
        elif scale == "batch":
            pooled = collectives.pooled(torch.cat(per_seg))
            adv = adv / (pooled.std() + eps if pooled.numel() > 1 else 1.0)
    if equal_groups == "zero":
        adv = adv * (~equal_reward_groups(ver.rewards, group_size))[:, None]
    adv = adv * ro.completion_mask.cpu() * valid[:, None]
    return Credit(
        advantages=adv.to(ro.completion_ids.device),
        valid=valid,
        stats=credit_stats(seg_r, values, ver),
        segment_credit=seg_r,
        values=values,
    )


def _per_segment(
    mode: str,
    values: list[torch.Tensor],
    seg_r: list[torch.Tensor],
    ver: Verified,
    group_size: int,
    alpha: float,
    scale_rewards: str,
) -> list[torch.Tensor]:
    """Per trace [K+1]: what each segment's tokens get (the last entry: the tokens after b_K), by `mode`."""
    R = torch.nan_to_num(ver.rewards, nan=0.0)
    if mode == "immediate":
        return seg_r
    if mode == "return_to_go":
        return [R[i] - v for i, v in enumerate(values)]  # segment k: R - V_(k-1); correction: R - V_K
    if mode == "anchored":
        m = group_mean(ver.rewards, group_size)
        return [R[i] - (v.clamp(0, 1) + (1 - v.clamp(0, 1)) * m[i]) for i, v in enumerate(values)]
    grpo = group_advantages(ver.rewards, group_size, scale=scale_rewards)  # mixed
    pooled = collectives.pooled(torch.cat(seg_r))  # every rank's segments: one unit for the whole batch
    unit = pooled.std() if pooled.numel() > 1 and pooled.std() > 0 else torch.tensor(1.0)
    return [grpo[i] + alpha * r / unit for i, r in enumerate(seg_r)]


def segment_tokens(bounds: list[int], length: int) -> torch.Tensor:
    """[K+1] tokens per segment, the last entry the tokens after b_K.
    Example: bounds [0, 2, 5], length 7 -> [2, 3, 2]."""
    return torch.tensor([b - a for a, b in zip(bounds, bounds[1:])] + [length - bounds[-1]], dtype=torch.float32)


def reweight_sigma(
    credits: torch.Tensor,
    advantage: float,
    bounds: list[int],
    length: int,
    *,
    how: str = "softmax",
    tau: float = 0.25,
    floor: float = 0.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """sigma [K+1] for one trace: the weight of each segment's tokens (the last entry: the tokens after b_K),
    with mean 1 over the trace's tokens, so the trace's total weight is GRPO's.

    Scores s_k = sign(A) r_k for the K thinking segments (a right trace weights the segments that raised V, a
    wrong one those that lowered it); the tokens after b_K get the neutral score, the token-weighted mean of
    the s_k, so that values with no information (all r_k equal) give sigma = 1: GRPO exactly.
      how="softmax"   u_k = exp(s_k / tau)
      how="positive"  u_k = max(s_k, 0)          (all zero: sigma = 1)
      then sigma_k = floor + (1 - floor) * u_k * L / sum_j u_j n_j    (>= floor; n_j tokens of segment j)
      how="signed"    sigma_k = 1 + alpha (s_k - s_bar) / mean_t |s - s_bar|   (RUDDER's intent: may be < 0)
    Example: r = [.3, -.1, .6 (correction)], 2 + 2 thinking tokens, 2 after b_K, A > 0, how="positive":
      s = [.3, -.1], neutral .1, u = [.3, 0, .1], sum_j u_j n_j = .8 over L = 6 tokens -> sigma = [2.25, 0, .75].
    """
    K = len(bounds) - 1
    # float64: credits far below float32's normal range (hypothesis found r = 2.9e-43) lose the precision that
    # sigma's normalisation needs; sigma itself goes back as float32
    inner = credits[:K].double() * (1.0 if advantage >= 0 else -1.0)
    if K == 0 or advantage == 0 or bool(inner.max() == inner.min()):
        return torch.ones(K + 1)
    n = segment_tokens(bounds, length)
    neutral = (inner * n[:K]).sum() / n[:K].sum().clamp(min=1.0)
    s = torch.cat([inner, neutral.view(1)])
    if how == "signed":
        unit = ((s - neutral).abs() * n).sum() / n.sum()
        return (1 + alpha * (s - neutral) / unit).float() if unit > 0 else torch.ones(K + 1)
    u = torch.exp((s - s.max()) / tau) if how == "softmax" else s.clamp(min=0)
    total = (u * n).sum()
    if total <= 0:
        return torch.ones(K + 1)
    return (floor + (1 - floor) * u * n.sum() / total).float()


def sigma_weighted(ro: Rollout, seg: Segmented, A: torch.Tensor, sigmas: list[torch.Tensor]) -> torch.Tensor:
    """[N, T] = A_i * sigma_(i, k) on the tokens of segment k of trace i (0 on padding): GRPO's advantage moved
    inside each trace. The one mechanism of mode=reweight and of the attribution estimators."""
    T = ro.completion_ids.shape[1]
    lengths = ro.lengths.tolist()
    adv = torch.stack([_spread(A[i].cpu() * sg, seg.boundaries[i], lengths[i], T) for i, sg in enumerate(sigmas)])
    return adv * ro.completion_mask.cpu()


def sigma_stats(sigmas: list[torch.Tensor]) -> dict[str, float]:
    """How far reweighting moves GRPO's gradient: the mean over traces of the largest and smallest sigma."""
    return {
        "credit/sigma_max": float(torch.stack([sg.max() for sg in sigmas]).mean()) if sigmas else 1.0,
        "credit/sigma_min": float(torch.stack([sg.min() for sg in sigmas]).mean()) if sigmas else 1.0,
    }


def _weighted(ro, ver, seg, weights: list[torch.Tensor], group_size: int, scale_rewards: str) -> Credit:
    """GRPO advantage A_i spread by segment weights w (sum 1): sigma_k = K * w_k on segment k (uniform w gives
    GRPO back), 1 on the tokens after b_K."""
    A = group_advantages(ver.rewards, group_size, scale=scale_rewards)
    sigmas = [torch.cat([len(w) * w, torch.ones(1)]) if len(w) else torch.ones(1) for w in weights]
    adv = sigma_weighted(ro, seg, A, sigmas)
    per_seg = [A[i].cpu() * sg for i, sg in enumerate(sigmas)]
    return Credit(advantages=adv.to(ro.completion_ids.device), valid=~torch.isnan(ver.rewards), segment_credit=per_seg)
