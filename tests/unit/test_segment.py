"""Segmenters: boundaries strictly increase, start at 0 and end at the thinking part's end."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rredcot.stages.segment import Trace, segment_fixed, segment_none, think_end_of


def test_fixed_example():
    # end 7, size 3 -> [0, 3, 6, 7]
    assert segment_fixed(Trace(list(range(9)), [0.0] * 9, think_end=7), size=3) == [0, 3, 6, 7]


def test_none_covers_the_trace_without_marker():
    assert segment_none(Trace([5, 6, 7], [0.0] * 3, None)) == [0, 3]


def test_think_end_of():
    assert think_end_of(["9", "</think>", "2", "</think>"]) == 3  # the last one, where the answer is read
    assert think_end_of(["7", "</", "think", ">", "\n7"]) == 1  # split into pieces: where it starts
    assert think_end_of(["7\n</", "think>"]) == 0  # starts inside a token
    assert think_end_of(["9", "2"]) is None


@given(n=st.integers(0, 80), size=st.integers(1, 20), marker=st.one_of(st.none(), st.integers(0, 79)))
def test_boundaries_properties(n, size, marker):
    end = None if marker is None or marker >= n else marker
    trace = Trace(list(range(n)), [0.0] * n, end)
    for bounds in (segment_fixed(trace, size=size), segment_none(trace)):
        assert bounds[0] == 0 and bounds[-1] == trace.end
        assert all(a < b for a, b in zip(bounds, bounds[1:]))


def test_fixed_rejects_bad_size():
    with pytest.raises(ValueError):
        segment_fixed(Trace([1], [0.0], None), size=0)


from rredcot.stages.segment import (  # noqa: E402
    DEFAULT_KEYWORDS,
    finalize,
    keyword_cuts,
    newline_cuts,
    segment_entropy,
    segment_hybrid,
    segment_keyword,
    segment_newline,
)


def _trace(text, entropies=None, marker="</think>"):
    """Characters as tokens ('</think>' one token), like the built-in tokenizer."""
    head, sep, tail = text.partition(marker)
    pieces = list(head) + ([marker] if sep else []) + list(tail)
    ent = entropies or [0.0] * len(pieces)
    return Trace(list(range(len(pieces))), ent, len(head) if sep else None, pieces)


def test_newline_cuts_after_each_line_break():
    assert newline_cuts(_trace("ab\ncd\ne</think>7")) == [3, 6]


def test_keyword_cuts_at_line_and_sentence_starts_only():
    t = _trace("x=1. So y\nWait, no\nSoon z")
    # 'So' after '. ' (offset 5) and 'Wait' at a line start (offset 10); 'Soon' is no keyword ('So' + letter)
    assert keyword_cuts(t, DEFAULT_KEYWORDS) == [5, 10]
    assert keyword_cuts(t, ["Soon"]) == [19]


def test_finalize_merges_splits_and_caps():
    t = _trace("a" * 10, entropies=[0.0] * 10)
    assert finalize([2, 5, 8], t, min_tokens=3) == [0, 5, 10]  # 2 and 8 are too close to the ends
    t = _trace("a" * 12, entropies=[0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0])
    assert finalize([], t, max_tokens=8) == [0, 7, 12]  # split at the highest entropy
    t = _trace("a" * 12, entropies=[0, 0, 5, 0, 9, 0, 1, 0, 0, 0, 0, 0])
    assert finalize([2, 4, 6, 8], t, max_segments=3) == [0, 2, 4, 12]  # keep the 2 highest-entropy cuts


def test_hybrid_on_a_builtin_trace():
    t = _trace("<\nb=3+4=7\nc=7*2=14\nWait, d=14-1=13\n</think>\n13")
    assert segment_hybrid(t) == [0, 10, 19, 35]  # '<\n' merged into the first line (min_tokens 4)


def test_entropy_segmenter_picks_forks_with_a_gap():
    ent = [0.0] * 20
    ent[5], ent[6], ent[14] = 3.0, 2.9, 2.5
    t = _trace("a" * 20, ent)
    assert segment_entropy(t, quantile=0.85, min_gap=4) == [0, 5, 14, 20]  # 6 is too close to 5


@given(
    text=st.text(alphabet="ab \n.SoWait", min_size=0, max_size=60),
    data=st.data(),
    min_tokens=st.integers(1, 6),
    max_tokens=st.integers(0, 30),
    max_segments=st.integers(0, 6),
)
def test_every_segmenter_keeps_the_rules(text, data, min_tokens, max_tokens, max_segments):
    ent = data.draw(st.lists(st.floats(0, 5), min_size=len(text) + 2, max_size=len(text) + 2))
    t = _trace(text + "</think>7", ent[: len(text) + 2])
    for fn in (segment_newline, segment_keyword, segment_entropy, segment_hybrid):
        kwargs = dict(min_tokens=min_tokens, max_tokens=max_tokens, max_segments=max_segments)
        b = fn(t, **kwargs)
        assert b[0] == 0 and b[-1] == t.end and all(x < y for x, y in zip(b, b[1:]))  # increase, cover
        if max_segments:
            assert len(b) - 1 <= max_segments  # the cap
        sizes = [y - x for x, y in zip(b, b[1:])]
        if len(sizes) > 1 and max_tokens == 0:
            assert min(sizes) >= min_tokens  # merged
        if max_tokens >= 2 * min_tokens and (not max_segments or len(sizes) < max_segments):
            assert max(sizes, default=0) <= max_tokens  # split


def test_newline_merge_preset_splits_at_lines_then_merges_the_lowest_entropy_cuts():
    """conf/segment/newline_merge.yaml: the segmentation of the paper's secondary account (newline split, then
    merged by entropy to a target count), which hybrid's keyword cuts and token bounds differ from."""
    from rredcot.compose import load_config

    seg = load_config(["segment=newline_merge"]).segment
    opts = {k: v for k, v in seg.items() if k != "name"}
    assert seg.name == "newline" and opts == {"min_tokens": 1, "max_tokens": 0, "max_segments": 8}
    text = "".join(f"s{i}\n" for i in range(10)) + "</think>\n7"  # 10 lines of 3 tokens: cuts 3, 6, ..., 27
    ent = [0.0] * 40
    for c in (6, 12, 27):
        ent[c] = -1.0  # the three cuts before the lowest-entropy tokens are merged away first
    t = _trace(text, ent)
    b = segment_newline(t, **{**opts, "max_segments": 7})
    assert b == [0, 3, 9, 15, 18, 21, 24, 30]  # 7 segments: 9 cuts less 3
    assert segment_newline(t, **opts) == [0, 3, 6, 9, 15, 18, 21, 24, 30]  # 8: only the lowest cut (12) merged
    words = _trace("x=1. So y=2\n</think>\n2")  # hybrid also cuts before 'So' inside the line
    assert segment_newline(words, **opts) == [0, 12] and segment_hybrid(words, min_tokens=1) == [0, 5, 12]
