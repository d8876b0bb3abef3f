"""Batch arithmetic: whether a step's completions split evenly, and fixes that make them split.

A step's N = train.generation_batch_size completions are whole groups of G = rollout.group_size; on W
processes each owns whole groups (N / G divisible by W); each process splits its N / W completions into
S = update.steps_per_generation optimizer steps of whole micro-batches of M = update.micro_batch_size.
Every fix `fixes` suggests changes one key and passes `fits` with the others as they are (tested on a
grid in tests/unit/test_batch_fit.py), so a message never names a value that fails the next check.
"""

from __future__ import annotations

from math import gcd


def fits(n: int, g: int, spg: int, micro: int, w: int = 1) -> bool:
    """Whether N completions split as described above."""
    return n % g == 0 and (n // g) % w == 0 and (n // w) % (spg * micro) == 0


def batch_size_fix(n: int, g: int, spg: int, micro: int, w: int = 1) -> int:
    """The generation batch size nearest `n` (not above it, unless none is) that fits."""
    step = w * g * spg * micro // gcd(g, spg * micro)  # w x lcm(G, S x M): whole groups and micro-batches per rank
    return max(step, n - n % step)


def micro_fix(n: int, g: int, spg: int, micro: int, w: int = 1) -> int | None:
    """The largest micro-batch size up to `micro` that fits (None if the batch or its optimizer steps do not
    split at any micro-batch size)."""
    if n % g or (n // g) % w or (n // w) % spg:
        return None
    per_step = n // w // spg
    return max(d for d in range(1, min(micro, per_step) + 1) if per_step % d == 0)


def steps_fix(n: int, g: int, spg: int, micro: int, w: int = 1) -> int | None:
    """The steps_per_generation nearest `spg` that fits (None if none does)."""
    if n % g or (n // g) % w or (n // w) % micro:
        return None
    per_micro = n // w // micro  # a 1e30 batch must not mean a 1e30-long search: look near spg only
    near = [d for d in range(1, min(per_micro, 4 * spg + 64) + 1) if per_micro % d == 0]
    return min(near, key=lambda d: (abs(d - spg), d))


def world_fixes(n: int, g: int, spg: int, micro: int, most: int = 64) -> list[int]:
    """The process counts (up to `most`) that fit."""
    return [k for k in range(1, most + 1) if fits(n, g, spg, micro, k)]


def fixes(n: int, g: int, spg: int, micro: int, w: int = 1) -> list[str]:
    """Overrides that each make the batch fit, the smallest change first: e.g. ['update.micro_batch_size=4',
    'train.generation_batch_size=64']. A batch of part-groups is first rounded down to whole groups."""
    out = []
    whole = max(g * w, n - n % (g * w))
    if n % (g * w) and not fits(whole, g, spg, micro, w) and (m := micro_fix(whole, g, spg, micro, w)):
        out.append(f"train.generation_batch_size={whole} with update.micro_batch_size={m}")
    if (m := micro_fix(n, g, spg, micro, w)) is not None:
        out.append(f"update.micro_batch_size={m}")
    if (s := steps_fix(n, g, spg, micro, w)) is not None and s != spg:
        out.append(f"update.steps_per_generation={s}")
    out.append(f"train.generation_batch_size={batch_size_fix(n, g, spg, micro, w)}")
    return out


def either(items: list) -> str:
    """'a', 'a or b', 'a, b or c'."""
    items = [str(i) for i in items]
    return " or ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " or " + items[-1]
