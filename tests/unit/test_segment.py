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
    assert think_end_of([9, 4, 2, 4], 4) == 1
    assert think_end_of([9, 2], 4) is None and think_end_of([9, 2], None) is None


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
