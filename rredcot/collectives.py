"""Collectives: what crosses ranks, and nothing else. N processes (torchrun or accelerate launch), each
owning whole prompt groups.

Segmenting, the probe pass and redistribution stay on the rank that sampled the group; only scalars and
the per-step records for logging cross ranks. Every collective here is called by all ranks, in the
same order, unconditionally (a collective one rank skips is a hang). With one process every function
is the plain single-process computation, so the same code path runs on a laptop and on a cluster.

Rank r of W owns the contiguous block of prompt slots [r * P / W, (r + 1) * P / W) of each step's P
prompts, so global row i (prompt slot i // G, completion i % G) is on the same rank at any W that
divides P, and sampling keyed by (seed, step, global row) gives the same completions at any W.
Sharded models (FSDP2, ZeRO) and their checkpoint state: rredcot/sharding.py.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Sequence

import torch
import torch.distributed as dist


def env_world_size() -> int:
    """The world size a launcher set (torchrun, accelerate launch, srun + torchrun), before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shard(items: Sequence, strict: bool = True) -> tuple[int, list]:
    """(offset, this rank's contiguous block of `items`). strict: the length must divide by the world size
    (training batches: checked at config time); otherwise the first ranks take one more (evaluation)."""
    n, w, r = len(items), size(), rank()
    if strict and n % w:
        raise ValueError(f"{n} items cannot be split evenly over {w} ranks")
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, list(items[lo : lo + base + (1 if r < extra else 0)])


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable; tensors should be on the CPU)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * size()
    dist.all_gather_object(out, obj)
    return out


def total(x: float) -> float:
    """The sum of a number over ranks (exact for counts: the dapo token denominator)."""
    if not active():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (a stop signal that reached one rank stops all)."""
    return total(1.0 if flag else 0.0) > 0


def pooled(x: torch.Tensor) -> torch.Tensor:
    """The 1-D tensor of every rank's values concatenated in rank order (batch statistics: scale=batch)."""
    if not active():
        return x
    return torch.cat([p.to(x.device) for p in gather(x.detach().cpu())])


def reduce_scalars(means: dict[str, float], maxes: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(per-key mean of `means`, per-key max of `maxes`) over ranks, in one gather; a key some rank lacks is
    reduced over the ranks that have it."""
    parts = gather((means, maxes))

    def reduce(i: int, how) -> dict[str, float]:
        keys = sorted({k for p in parts for k in p[i]})
        return {k: how([float(p[i][k]) for p in parts if k in p[i]]) for k in keys}

    return reduce(0, lambda v: sum(v) / len(v)), reduce(1, max)


@contextmanager
def main_first():
    """Rank 0 runs the block first (builds the warm-start cache, prepares data); the others wait, then run it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (the run directory's name, chosen once)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
