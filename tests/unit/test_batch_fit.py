"""Batch arithmetic (rredcot/batch_fit.py): every fix a divisibility message names passes every check."""

from __future__ import annotations

import itertools

import pytest

from rredcot.batch_fit import batch_size_fix, either, fits, fixes, micro_fix, steps_fix, world_fixes
from rredcot.checks import _check_batches, check_data_parallel
from rredcot.errors import UserError
from tests.unit.test_distributed import _cfg  # the batch keys the checks read

GRID = list(itertools.product(range(1, 49), (2, 3, 4, 8), (1, 2, 3), (1, 2, 3, 8, 12, 64), (1, 2, 3, 4)))


def _apply(fix: str, n: int, g: int, spg: int, micro: int) -> tuple[int, int, int, int]:
    """(n, g, spg, micro) after a fix such as 'train.generation_batch_size=24 with update.micro_batch_size=8'."""
    values = {"train.generation_batch_size": n, "rollout.group_size": g}
    values.update({"update.steps_per_generation": spg, "update.micro_batch_size": micro})
    for part in fix.split(" with "):
        key, value = part.split("=")
        assert key in values, fix
        values[key] = int(value)
    return tuple(values.values())


def test_every_suggested_fix_fits_on_a_grid():
    for n, g, spg, micro, w in GRID:
        if fits(n, g, spg, micro, w):
            continue
        suggested = fixes(n, g, spg, micro, w)
        assert suggested, (n, g, spg, micro, w)
        for fix in suggested:
            assert fits(*_apply(fix, n, g, spg, micro), w), (fix, n, g, spg, micro, w)


def test_the_pieces_are_right_on_the_grid():
    for n, g, spg, micro, w in GRID:
        assert fits(batch_size_fix(n, g, spg, micro, w), g, spg, micro, w)
        if (m := micro_fix(n, g, spg, micro, w)) is not None:
            assert m <= micro and fits(n, g, spg, m, w)
        if (s := steps_fix(n, g, spg, micro, w)) is not None:
            assert fits(n, g, s, micro, w)
        assert all(fits(n, g, spg, micro, k) for k in world_fixes(n, g, spg, micro, 8))


def test_a_huge_batch_is_answered_at_once():
    n = 10**30 + 2  # not whole groups of 4: the search must not walk 1e30 divisors
    assert all(fits(*_apply(f, n, 4, 3, 8)) for f in fixes(n, 4, 3, 8))


def test_either():
    assert either([1]) == "1" and either([1, 2]) == "1 or 2" and either([1, 2, 3]) == "1, 2 or 3"


@pytest.mark.parametrize(
    "cfg, world",
    [(_cfg(30), 1), (_cfg(64, micro=48), 1), (_cfg(64, 8, 3, 8), 1), (_cfg(), 3), (_cfg(), 4), (_cfg(16, 4, 1, 8), 3)],
)
def test_the_messages_name_fixes_that_pass_the_check(cfg, world):
    """The message's own suggestions, applied, pass both checks (the old ones named 24 for micro-batches of 64)."""
    with pytest.raises(UserError) as e:
        _check_batches(cfg) if world == 1 else check_data_parallel(cfg, world)
    n, g = cfg.train.generation_batch_size, cfg.rollout.group_size
    spg, micro = cfg["update"].steps_per_generation, cfg["update"].micro_batch_size  # .update: a DictConfig method
    named = [f for f in fixes(n, g, spg, micro, world) if f in str(e.value)]
    assert named, str(e.value)
    for fix in named:
        n2, g2, s2, m2 = _apply(fix, n, g, spg, micro)
        fixed = _cfg(n2, g2, s2, m2)
        _check_batches(fixed)
        check_data_parallel(fixed, world)


def test_three_processes_name_only_world_sizes_that_fit():
    with pytest.raises(UserError) as e:
        check_data_parallel(_cfg(), 3)  # 16 prompts of 8, micro-batches of 64 per process: 1 or 2 processes
    assert "(1 or 2)" in str(e.value) and "train.generation_batch_size=120 with update.micro_batch_size=40" in str(
        e.value
    )
