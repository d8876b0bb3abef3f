"""draw(): the two-level inverse CDF against the one-cumsum draw it replaced, on hand-sized rows and properties."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rredcot.stages import sampling
from rredcot.stages.sampling import _first_past, block_sums, draw, filter_logits

BLOCKS = [1, 2, 3, 4, 7, 16, 1024]  # 1024 > V: the one-block path; 3, 7: a partial last block


def draw_full_cumsum(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The reference: draw() up to issue 23, one float64 cumsum over the whole vocabulary ([N, V] float64)."""
    cdf = probs.double().cumsum(-1)
    target = u.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    return (cdf <= target).sum(-1).clamp(max=probs.shape[-1] - 1)


def near_a_boundary(row: list[float], u: float, a: int, b: int, rel: float = 1e-12) -> bool:
    """Whether, in exact arithmetic, u * total lies within `rel` of a CDF boundary between tokens a and b: the
    only place where two summation orders may choose differently."""
    exact = [Fraction(x) for x in row]
    total = sum(exact)
    target = Fraction(u) * total
    lo, hi = sorted((a, b))
    cdf = sum(exact[:lo])
    for p in exact[lo:hi]:
        cdf += p
        if abs(cdf - target) <= rel * total:
            return True
    return False


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("u, expect", [(0.0, 0), (0.1, 0), (0.2, 2), (0.69, 2), (0.71, 3), (0.95, 3), (0.9999, 3)])
def test_the_docstring_table_at_every_block_size(u, expect, block):
    # probs [.2, 0, .5, .3]: cdf [.2, .2, .7, 1.0]; token i when cdf[i-1] <= u < cdf[i] (token 1 has no mass).
    # block 1 or 2: u = .2 lands on a block edge (the block [.2] or [.2, 0] ends there), block 3: on a
    # zero inside the first block
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]])
    assert int(draw(probs, torch.tensor([u]), block=block)) == expect


@pytest.mark.parametrize("block", BLOCKS)
def test_unnormalised_rows_zero_blocks_and_exact_edges(block):
    # mass 4 in [0, 0, 0, 0, 1, 0, 0, 3] (a filtered row, not normalised): u*total = 0 -> 4, 1 (the edge
    # after token 4, exactly) -> 7, 3.99 -> 7; u just below 1 -> 7, never a zero token
    probs = torch.tensor([[0, 0, 0, 0, 1.0, 0, 0, 3.0]] * 5)
    u = torch.tensor([0.0, 0.2, 0.25, 0.9975, 1 - 2**-53], dtype=torch.float64)
    assert draw(probs, u, block=block).tolist() == [4, 4, 7, 7, 7]


def test_past_the_end_gives_the_last_token_with_mass():
    # r at or past a block's end (summation-order rounding between the block sum and the cumsum inside it)
    vals = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    cdf = vals.cumsum(-1)
    assert _first_past(vals, cdf, torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist() == [2, 0]
    assert _first_past(vals, cdf, torch.tensor([0.5, 0.0], dtype=torch.float64)).tolist() == [2, 0]


def test_block_sums_are_float64_with_a_partial_last_block(monkeypatch):
    monkeypatch.setattr(
        sampling, "DRAW_SCRATCH", 18
    )  # 2 rows of 3 x 3 per chunk: 5 rows take 3 chunks, the last padded
    probs = torch.arange(35, dtype=torch.float32).reshape(5, 7) + 2**-20  # float32 sums of these would round
    got = block_sums(probs, 3)  # [5, 3]: blocks of 3, 3, 1 tokens
    d = probs.double()
    want = torch.stack([d[:, 0:3].sum(-1), d[:, 3:6].sum(-1), d[:, 6]], -1)
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_no_rows():
    assert draw(torch.zeros(0, 3000), torch.zeros(0)).shape == (0,)


# probabilities with runs of zeros and tiny masses (1e-30 next to .5: lost in float32 sums, not in float64)
mass = st.one_of(st.just(0.0), st.floats(1e-38, 1e-30), st.floats(1e-8, 1.0), st.floats(0.0, 1.0))
row = st.lists(st.one_of(mass, st.lists(st.just(0.0), min_size=1, max_size=20)), min_size=1, max_size=40).map(
    lambda xs: [y for x in xs for y in (x if isinstance(x, list) else [x])]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(row, st.floats(0.0, 1.0, exclude_max=True)), min_size=1, max_size=4), st.sampled_from(BLOCKS))
def test_the_same_token_as_one_full_cumsum(rows, block):
    width = max(len(r) for r, _ in rows)
    rows = [(r + [0.0] * (width - len(r)), u) for r, u in rows]
    probs = torch.tensor([r for r, _ in rows], dtype=torch.float32)
    u = torch.tensor([u for _, u in rows], dtype=torch.float64)
    ok = probs.double().sum(-1) > 0
    got, want = draw(probs, u, block=block), draw_full_cumsum(probs, u)
    if block >= width:  # one block: the same code as the reference, bitwise (zero rows included)
        assert torch.equal(got, want)
    for i, (r, ui) in enumerate(rows):
        if not ok[i]:
            continue  # a row without mass: nothing to draw
        f32 = probs[i].tolist()  # the float32 values both draws sum
        assert f32[int(got[i])] > 0, "a zero-probability token was drawn"
        assert got[i] == want[i] or near_a_boundary(f32, ui, int(got[i]), int(want[i]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=1, max_size=60), st.data(), st.sampled_from(BLOCKS))
def test_exact_sums_choose_identically_also_on_block_edges(counts, data, block):
    # integer masses whose total is a power of two: every sum is exact in any order, and u = t / total puts
    # u * total exactly on t; t a prefix sum is a CDF boundary (often a block edge)
    total = 1 << max(sum(counts), 1).bit_length()
    counts = counts + [total - sum(counts)]
    prefix = [sum(counts[:j]) for j in range(len(counts))]
    t = data.draw(st.one_of(st.sampled_from(prefix), st.integers(0, total - 1)))
    probs = torch.tensor([counts], dtype=torch.float32)
    u = torch.tensor([t / total], dtype=torch.float64)
    assert int(draw(probs, u, block=block)) == int(draw_full_cumsum(probs, u))


@pytest.mark.parametrize("seed", range(3))
def test_a_rows_token_does_not_depend_on_the_other_rows(monkeypatch, seed):
    monkeypatch.setattr(sampling, "DRAW_SCRATCH", 3 * 208)  # 3 rows per chunk: V = 200 is 13 blocks of 16
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(11, 200, generator=g) * 4
    probs = torch.softmax(filter_logits(logits[:7], top_k=30), -1)  # most of each row's blocks zero
    probs = torch.cat([probs, torch.softmax(logits[7:], -1)])
    u = torch.rand(11, generator=g, dtype=torch.float64)
    whole = draw(probs, u, block=16)
    alone = torch.cat([draw(probs[i : i + 1], u[i : i + 1], block=16) for i in range(11)])
    order = torch.randperm(11, generator=g)
    shuffled = draw(probs[order], u[order], block=16)
    others = torch.softmax(torch.randn(5, 200, generator=g), -1)
    mixed = draw(torch.cat([others, probs[:4]]), torch.cat([torch.rand(5, dtype=torch.float64), u[:4]]), block=16)
    assert torch.equal(whole, alone) and torch.equal(whole[order], shuffled) and torch.equal(whole[:4], mixed[5:])
    assert torch.equal(whole, draw_full_cumsum(probs, u))


def test_the_qwen2_vocabulary_with_filtered_rows():
    # the real block size (1024) over 151,936 tokens: 148 full blocks and a partial one; top-k and top-p
    # rows leave most blocks zero, and u sweeps the whole range
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 151_936, generator=g) * 3
    probs = torch.cat(
        [
            torch.softmax(logits[:2], -1),
            torch.softmax(filter_logits(logits[2:4], top_k=50), -1),
            torch.softmax(filter_logits(logits[4:], top_p=0.5), -1),
        ]
    )
    probs[0, -5:] = 0.3  # mass in the partial last block
    for u in torch.linspace(0, 1 - 2**-53, 7, dtype=torch.float64):
        us = u.repeat(6)
        assert torch.equal(draw(probs, us), draw_full_cumsum(probs, us))
    us = torch.rand(6, generator=g, dtype=torch.float64)
    assert torch.equal(draw(probs, us), draw_full_cumsum(probs, us))
