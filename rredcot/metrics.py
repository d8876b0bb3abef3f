"""What one RL step logs: the metrics of the whole generation batch (gathered from every rank: gather_step),
the update's statistics averaged over ranks and its stage times (the slowest rank's)."""

from __future__ import annotations

from typing import Any

import torch

from rredcot import collectives
from rredcot.advantages import advantage_by_group, credit_stats, frac_zero_std
from rredcot.stages.sampling import pad_cat
from rredcot.stages.segment import segment_lengths
from rredcot.types import Credit, Rollout, Segmented, Verified


def global_metrics(records: tuple, upd: dict, times: dict[str, float], group_size: int) -> dict[str, Any]:
    """step_metrics of the whole generation batch: `records` = gather_step(...), the update's
    statistics averaged over ranks (equal micro-batch counts: the single-process means), each stage's time
    and the memory of the slowest / largest rank. Every rank calls it (collectives in a fixed order)."""
    upd, slowest = collectives.reduce_scalars(upd, {**times, "memory": peak_memory_mb()})
    memory = slowest.pop("memory")
    return {**step_metrics(*records, upd, slowest, group_size), "memory/peak_mb": memory}


def step_metrics(ro, ver, seg, credit, upd: dict, times: dict[str, float], group_size: int) -> dict[str, Any]:
    """What a user watches: reward, accuracy, lengths, entropy, credit spread, losses, stage times
    (global_metrics adds the peak memory)."""
    lengths = ro.lengths.float()
    mask = ro.completion_mask.bool()
    valid = ~torch.isnan(ver.rewards)
    out = {
        "reward/mean": float(ver.rewards[valid].mean()) if valid.any() else float("nan"),
        "reward/std": float(ver.rewards[valid].std()) if valid.sum() > 1 else 0.0,
        "accuracy": float(ver.correct.float().mean()),
        "frac_reward_zero_std": frac_zero_std(ver.rewards, group_size),  # the equal-rewards rule (advantages.py)
        "frac_reward_undefined": float((~valid).float().mean()),
        "completion/mean_length": float(lengths.mean()),
        "completion/max_length": float(lengths.max()),
        "completion/clipped_ratio": float(ro.truncated.float().mean()),
        "entropy": float(ro.entropies[mask].mean()),
        "segments/per_trace": float(segment_lengths(seg).mean()),
        "completion/unclosed_think_frac": sum(e is None for e in seg.think_end) / max(len(seg.think_end), 1),
        "advantage/token_std": float(credit.advantages[mask].std()) if mask.sum() > 1 else 0.0,
        **advantage_by_group(
            credit.advantages, ro.completion_mask * credit.valid.to(mask.device)[:, None], ver.correct, group_size
        ),
        **{f"reward/{k}/mean": float(torch.nanmean(v)) for k, v in ver.per_func.items()},
        **{f"extractor/{e}": ver.extractor.count(e) / len(ver.extractor) for e in sorted(set(ver.extractor))},
        **credit.stats,
        **upd,
    }
    out.update({f"time/{k}_s": v for k, v in times.items()})
    out["time/step_s"] = sum(times.values())
    out["tokens/s"] = float(lengths.sum()) / max(out["time/step_s"], 1e-9)
    return out


def peak_memory_mb() -> float:
    """Peak accelerator memory if there is one, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sample_rows(ro, ver, seg, k: int) -> list[dict[str, Any]]:
    """The first k completions of the batch as samples/step_N.jsonl rows."""
    return [
        {"prompt": s.prompt, "gold": s.gold, "completion": txt, "reward": float(r), "segments": b}
        for s, txt, r, b in list(zip(ro.samples, ro.texts, ver.rewards.tolist(), seg.boundaries))[:k]
    ]


def gather_step(ro, ver, seg, credit):
    """The whole generation batch's (Rollout, Verified, Segmented, Credit) on every rank, rows in global order
    (rank 0's first), for the logged metrics and samples. Prompt tokens are left behind (nothing logged reads
    them); the value estimators' credit statistics are recomputed on the whole batch, the others (per-trace
    means over equal shares) averaged over ranks. One process: the records themselves."""
    if not collectives.active():
        return ro, ver, seg, credit
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    mine = (
        {k: cpu(getattr(ro, k)) for k in ("completion_ids", "completion_mask", "logprobs", "entropies", "truncated")},
        ro.texts,
        ro.samples,
        (cpu(ver.rewards), {k: cpu(v) for k, v in sorted(ver.per_func.items())}, cpu(ver.correct), ver.extractor),
        seg,
        (
            cpu(credit.advantages),
            cpu(credit.valid),
            dict(sorted(credit.stats.items())),
            credit.segment_credit,
            credit.values,
        ),
    )
    parts = collectives.gather(mine)
    t = {k: [p[0][k] for p in parts] for k in mine[0]}
    n = sum(len(p[1]) for p in parts)
    g_ro = Rollout(
        torch.zeros(n, 0, dtype=torch.long),
        torch.zeros(n, 0, dtype=torch.long),
        pad_cat(t["completion_ids"]),
        pad_cat(t["completion_mask"]),
        pad_cat(t["logprobs"]),
        pad_cat(t["entropies"]),
        torch.cat(t["truncated"]),
        [x for p in parts for x in p[1]],
        [x for p in parts for x in p[2]],
        ro.group_size,
    )
    vs = [p[3] for p in parts]
    g_ver = Verified(
        torch.cat([v[0] for v in vs]),
        {k: torch.cat([v[1][k] for v in vs]) for k in vs[0][1]},
        torch.cat([v[2] for v in vs]),
        [x for v in vs for x in v[3]],
    )
    g_seg = Segmented([b for p in parts for b in p[4].boundaries], [e for p in parts for e in p[4].think_end])
    cs = [p[5] for p in parts]
    stats = {k: sum(c[2][k] for c in cs) / len(cs) for k in cs[0][2]}
    lists = lambda i: None if cs[0][i] is None else [x for c in cs for x in c[i]]  # noqa: E731
    g_credit = Credit(pad_cat([c[0] for c in cs]), torch.cat([c[1] for c in cs]), stats, lists(3), lists(4))
    if g_credit.values is not None and g_credit.segment_credit is not None:  # value estimators: exact, not averaged
        stats.update(credit_stats(g_credit.segment_credit, g_credit.values, g_ver))
    return g_ro, g_ver, g_seg, g_credit
