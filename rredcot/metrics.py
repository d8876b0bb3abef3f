"""What one RL step logs: the metrics of the whole generation batch (gathered from every rank), the
update's statistics averaged over ranks and its stage times (the slowest rank's)."""
from __future__ import annotations

from typing import Any

import torch

from rredcot import distributed
from rredcot.stages.segment import segment_lengths
from rredcot.stages.update import advantage_by_group, frac_zero_std


def global_metrics(records: tuple, upd: dict, times: dict[str, float], group_size: int) -> dict[str, Any]:
    """step_metrics of the whole generation batch: `records` = distributed.gather_step(...), the update's
    statistics averaged over ranks (equal micro-batch counts: the single-process means), each stage's time
    and the memory of the slowest / largest rank. Every rank calls it (collectives in a fixed order)."""
    upd, slowest = distributed.reduce_scalars(upd, {**times, "memory": peak_memory_mb()})
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
        "frac_reward_zero_std": frac_zero_std(torch.nan_to_num(ver.rewards, nan=-1.0), group_size),
        "frac_reward_undefined": float((~valid).float().mean()),
        "completion/mean_length": float(lengths.mean()),
        "completion/max_length": float(lengths.max()),
        "completion/clipped_ratio": float(ro.truncated.float().mean()),
        "entropy": float(ro.entropies[mask].mean()),
        "segments/per_trace": float(segment_lengths(seg).mean()),
        "completion/unclosed_think_frac": sum(e is None for e in seg.think_end) / max(len(seg.think_end), 1),
        "advantage/token_std": float(credit.advantages[mask].std()) if mask.sum() > 1 else 0.0,
        **advantage_by_group(credit.advantages, ro.completion_mask * credit.valid.to(mask.device)[:, None], ver.correct,
                             group_size),
        **{f"reward/{k}/mean": float(torch.nanmean(v)) for k, v in ver.per_func.items()},
        **{f"extractor/{e}": ver.extractor.count(e) / len(ver.extractor) for e in sorted(set(ver.extractor))},
        **credit.stats, **upd,
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
    return [{"prompt": s.prompt, "gold": s.gold, "completion": txt, "reward": float(r), "segments": b}
            for s, txt, r, b in list(zip(ro.samples, ro.texts, ver.rewards.tolist(), seg.boundaries))[:k]]
