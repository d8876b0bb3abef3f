"""Segment stage: map each completion to boundaries 0 = b_0 < b_1 < ... < b_K <= T.

Segments cover the thinking part; tokens after b_K (the end-of-thinking marker and the answer) form
the correction segment. A completion without a marker is segmented whole. Segmenters are pure
functions of one trace; `run_segment` applies one to a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rredcot.registry import register
from rredcot.types import Rollout, Segmented


@dataclass(frozen=True)
class Trace:
    """One completion as a segmenter sees it."""

    ids: list[int]  # the completion tokens (EOS included, padding not)
    entropies: list[float]  # per-token entropy from the rollout's logits
    think_end: int | None  # offset of the end-of-thinking marker, None if the trace has none

    @property
    def end(self) -> int:
        """Where the segmented part stops: the marker, else the whole completion."""
        return len(self.ids) if self.think_end is None else self.think_end


@register("segment", "none")
def segment_none(trace: Trace) -> list[int]:
    """One segment: the whole thinking part. Example: end 7 -> [0, 7]."""
    return [0, trace.end] if trace.end > 0 else [0]


@register("segment", "fixed")
def segment_fixed(trace: Trace, size: int = 16) -> list[int]:
    """Every `size` tokens. Example: end 7, size 3 -> [0, 3, 6, 7]."""
    if size < 1:
        raise ValueError(f"segment.size must be >= 1, got {size}")
    cuts = list(range(0, trace.end, size))
    return cuts + [trace.end] if trace.end > 0 else [0]


def think_end_of(ids: list[int], marker_id: int | None) -> int | None:
    """Offset of the first end-of-thinking token, or None (no marker token, or not in this trace)."""
    if marker_id is None or marker_id not in ids:
        return None
    return ids.index(marker_id)


def run_segment(rollout: Rollout, fn: Callable[[Trace], list[int]], marker_id: int | None) -> Segmented:
    """Apply segmenter `fn` to every row of the rollout."""
    bounds, ends = [], []
    lengths = rollout.lengths.tolist()
    for row, n in enumerate(lengths):
        ids = rollout.completion_ids[row, :n].tolist()
        trace = Trace(ids, rollout.entropies[row, :n].tolist(), think_end_of(ids, marker_id))
        bounds.append(fn(trace))
        ends.append(trace.think_end)
    return Segmented(boundaries=bounds, think_end=ends)


def segment_lengths(seg: Segmented) -> torch.Tensor:
    """[N] number of segments per trace (for the logs)."""
    return torch.tensor([max(len(b) - 1, 0) for b in seg.boundaries], dtype=torch.float)
