"""Segment stage: map each completion to boundaries 0 = b_0 < b_1 < ... < b_K <= T.

A boundary b is a prefix length: segment k is tokens b_(k-1) .. b_k - 1. Segments cover the thinking
part; tokens from b_K on (the end-of-thinking marker and the answer) form the correction segment. A
completion without a marker is segmented whole. Segmenters are pure functions of one `Trace` that
propose cuts; `finalize` applies the shared rules (min_tokens, max_tokens, max_segments).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from rredcot.ranges import COUNT, NATURAL, Rule, list_of, number, optional
from rredcot.registry import register
from rredcot.task.arith import THINK_CLOSE
from rredcot.types import Rollout, Segmented

DEFAULT_KEYWORDS = (
    "Wait",
    "But",
    "Alternatively",
    "Hmm",
    "However",
    "So",
    "Therefore",
    "Let me",
    "Now",
    "Next",
    "Actually",
    "Then",
    "First",
    "Finally",
    "Thus",
    "Hence",
    "Check",
)


@dataclass(frozen=True)
class Trace:
    """One completion as a segmenter sees it."""

    ids: list[int]  # the completion tokens (EOS included, padding not)
    entropies: list[float]  # per-token entropy from the rollout's logits
    think_end: int | None  # offset of the end-of-thinking marker, None if the trace has none
    pieces: Sequence[str] = ()  # decoded text of each token (for newline / keyword rules)

    @property
    def end(self) -> int:
        """Where the segmented part stops: the marker, else the whole completion."""
        return len(self.ids) if self.think_end is None else self.think_end


def finalize(
    cuts: Iterable[int], trace: Trace, min_tokens: int = 1, max_tokens: int = 0, max_segments: int = 0
) -> list[int]:
    """Interior cut candidates -> boundaries [0, ..., end].

    1. merge: drop cuts that would close a segment shorter than `min_tokens` (left to right; the last
       segment too); 2. split: a segment longer than `max_tokens` (0 = no limit) is cut at its
       highest-entropy token, recursively, keeping both parts >= min_tokens where possible;
    3. cap: keep the `max_segments - 1` interior cuts (0 = no cap) whose next token has the highest entropy.
    Example: end 10, cuts [2, 5, 8], min_tokens 3 -> [0, 5, 10] (2 is too close to 0, 8 to 10).
    """
    end, ent = trace.end, trace.entropies
    if end <= 0:
        return [0]
    kept, prev = [], 0
    for c in sorted({c for c in cuts if 0 < c < end}):
        if c - prev >= min_tokens:
            kept.append(c)
            prev = c
    if kept and end - kept[-1] < min_tokens:
        kept.pop()
    if max_tokens:
        bounds = [0, *kept, end]
        kept = [c for lo, hi in zip(bounds, bounds[1:]) for c in _split(lo, hi, ent, min_tokens, max_tokens)] + kept
    kept = sorted(set(kept))
    if max_segments and len(kept) > max_segments - 1:
        kept = sorted(sorted(kept, key=lambda c: -ent[c])[: max_segments - 1])
    return [0, *kept, end]


def _split(lo: int, hi: int, ent: Sequence[float], min_tokens: int, max_tokens: int) -> list[int]:
    if hi - lo <= max_tokens:
        return []
    room = range(lo + min_tokens, hi - min_tokens + 1)
    room = room if len(room) else range(lo + 1, hi)
    c = max(room, key=lambda i: ent[i])
    return _split(lo, c, ent, min_tokens, max_tokens) + [c] + _split(c, hi, ent, min_tokens, max_tokens)


def _offsets(pieces: Sequence[str]) -> list[int]:
    out, pos = [], 0
    for p in pieces:
        out.append(pos)
        pos += len(p)
    return out


def newline_cuts(trace: Trace) -> list[int]:
    """A cut after every token that contains a line break. Example: 'a\\nb\\n' per char -> [2, 4]."""
    return [i + 1 for i, p in enumerate(trace.pieces[: trace.end]) if "\n" in p]


def keyword_cuts(trace: Trace, keywords: Sequence[str] = DEFAULT_KEYWORDS) -> list[int]:
    """A cut before each token where a keyword opens a line or a sentence ('Wait,', '. So', '\\nBut')."""
    if not keywords:
        return []
    text = "".join(trace.pieces[: trace.end])
    alts = "|".join(re.escape(k) for k in sorted(keywords, key=len, reverse=True))
    pattern = re.compile(rf"(?:^|(?<=[\n.!?]))[ \t]*({alts})\b", re.M)
    offsets = _offsets(trace.pieces[: trace.end])
    return [bisect.bisect_right(offsets, m.start(1)) - 1 for m in pattern.finditer(text)]


def entropy_cuts(trace: Trace, quantile: float = 0.9, threshold: float | None = None, min_gap: int = 4) -> list[int]:
    """A cut before each 'forking' token: entropy >= the trace's `quantile` (or >= `threshold`),
    highest first, at least `min_gap` tokens apart."""
    ent = trace.entropies[1 : trace.end]  # a cut before token 0 would be the empty prefix
    if not ent:
        return []
    cut = threshold if threshold is not None else float(torch.tensor(ent).quantile(quantile))
    chosen: list[int] = []
    for i in sorted(range(len(ent)), key=lambda j: -ent[j]):
        if ent[i] >= cut and all(abs(i + 1 - c) >= min_gap for c in chosen):
            chosen.append(i + 1)
    return chosen


# The valid range of every segmenter option (checked at config time).
RULES = {
    "size": COUNT,
    "min_tokens": COUNT,
    "max_tokens": NATURAL,
    "max_segments": NATURAL,
    "quantile": number(0, 1, lo_open=True),
    "threshold": optional(number()),
    "min_gap": COUNT,
    "keywords": list_of(Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")),
}


@register("segment", "none", RULES)
def segment_none(trace: Trace) -> list[int]:
    """One segment: the whole thinking part. Example: end 7 -> [0, 7]."""
    return finalize([], trace)


@register("segment", "fixed", RULES)
def segment_fixed(
    trace: Trace, size: int = 16, min_tokens: int = 1, max_tokens: int = 0, max_segments: int = 0
) -> list[int]:
    """Every `size` tokens. Example: end 7, size 3 -> [0, 3, 6, 7]."""
    if size < 1:
        raise ValueError(f"segment.size must be >= 1, got {size}")
    return finalize(range(size, trace.end, size), trace, min_tokens, max_tokens, max_segments)


@register("segment", "newline", RULES)
def segment_newline(trace: Trace, min_tokens: int = 1, max_tokens: int = 0, max_segments: int = 0) -> list[int]:
    """At line breaks."""
    return finalize(newline_cuts(trace), trace, min_tokens, max_tokens, max_segments)


@register("segment", "keyword", RULES)
def segment_keyword(
    trace: Trace,
    keywords: Sequence[str] = DEFAULT_KEYWORDS,
    min_tokens: int = 1,
    max_tokens: int = 0,
    max_segments: int = 0,
) -> list[int]:
    """Before discourse markers that open a reasoning move."""
    return finalize(keyword_cuts(trace, keywords), trace, min_tokens, max_tokens, max_segments)


@register("segment", "entropy", RULES)
def segment_entropy(
    trace: Trace,
    quantile: float = 0.9,
    threshold: float | None = None,
    min_gap: int = 4,
    min_tokens: int = 1,
    max_tokens: int = 0,
    max_segments: int = 0,
) -> list[int]:
    """Before high-entropy ('forking') tokens."""
    return finalize(entropy_cuts(trace, quantile, threshold, min_gap), trace, min_tokens, max_tokens, max_segments)


@register("segment", "hybrid", RULES)
def segment_hybrid(
    trace: Trace,
    keywords: Sequence[str] = DEFAULT_KEYWORDS,
    min_tokens: int = 4,
    max_tokens: int = 64,
    max_segments: int = 8,
) -> list[int]:
    """The paper's: line and keyword candidates, merged below min_tokens, split above max_tokens at the
    highest-entropy token, at most max_segments segments (highest-entropy cuts kept)."""
    return finalize(newline_cuts(trace) + keyword_cuts(trace, keywords), trace, min_tokens, max_tokens, max_segments)


def think_marker(cfg) -> str | None:
    """model.think_end ("" or null: the model answers without thinking; configs from before the key: </think>)."""
    return cfg.model.get("think_end", THINK_CLOSE) or None


def think_end_of(pieces: Sequence[str], marker: str | None = THINK_CLOSE) -> int | None:
    """Token offset where the last end-of-thinking marker starts, found in the decoded text, so a
    marker that the tokenizer splits into several tokens (most models without a `</think>` token) counts.
    Example: pieces ['7', '</', 'think', '>', '7'] -> 1; no marker -> None."""
    if not marker:  # a model that does not think
        return None
    text = "".join(pieces)
    at = text.rfind(marker)  # the last one, where answer extraction reads the answer
    return None if at < 0 else bisect.bisect_right(_offsets(pieces), at) - 1


class PieceDecoder:
    """Token id -> its text, cached (segmenters need the text of every token of every trace)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, ids: list[int]) -> list[str]:
        for i in ids:
            if i not in self.cache:
                self.cache[i] = self.tokenizer.decode([i], skip_special_tokens=False)
        return [self.cache[i] for i in ids]


def without_answer_part(bounds: list[int], trace: Trace) -> list[int]:
    """A segmenter's boundaries end at trace.end. With an end-of-thinking marker that is the marker, and
    the answer after it is the correction segment (R - V_K). Without one (a truncated trace, or a model
    that answers without thinking) there is no answer part: the last boundary (the completion's end) is
    dropped, so the last segment is the correction segment, R - V_(K-1) lands on real tokens, and no
    probe is scored after EOS. Example, 9 tokens: [0, 4, 9] -> [0, 4]; with a marker at 7, [0, 4, 7] stays."""
    if trace.think_end is None and len(bounds) > 1 and bounds[-1] >= len(trace.ids):
        return bounds[:-1]
    return bounds


def run_segment(
    rollout: Rollout,
    fn: Callable[[Trace], list[int]],
    pieces: Callable[[list[int]], list[str]],
    marker: str | None = THINK_CLOSE,
) -> Segmented:
    """Apply segmenter `fn` to every row of the rollout; `pieces` decodes each token (PieceDecoder)."""
    bounds, ends = [], []
    for row, n in enumerate(rollout.lengths.tolist()):
        ids = rollout.completion_ids[row, :n].tolist()
        text = pieces(ids)
        trace = Trace(ids, rollout.entropies[row, :n].tolist(), think_end_of(text, marker), text)
        bounds.append(without_answer_part(fn(trace), trace))
        ends.append(trace.think_end)
    return Segmented(boundaries=bounds, think_end=ends)


def segment_lengths(seg: Segmented) -> torch.Tensor:
    """[N] number of segments per trace (for the logs)."""
    return torch.tensor([max(len(b) - 1, 0) for b in seg.boundaries], dtype=torch.float)
