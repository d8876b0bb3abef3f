"""Split hygiene: held-out splits never share prompts with training (check_disjoint), a dev split carved out
of the training rows by prompt hash (carve_dev), and prompts too long for the model left out and counted
(drop_long_prompts)."""

from __future__ import annotations

import hashlib
from typing import Any

from rredcot.errors import UserError
from rredcot.types import Sample
from rredcot.ui import note


def question_hash(text: str) -> str:
    return hashlib.sha256(text.strip().encode()).hexdigest()


def carve_dev(train: list[Sample], dev_size: int) -> tuple[list[Sample], list[Sample]]:
    """(train without dev, dev): dev = the dev_size prompts whose hash is lowest, so it is the same for
    every run and every row order; duplicates of a dev prompt leave training too."""
    keys = [question_hash(s.prompt) for s in train]
    ranked = sorted(set(keys))
    if dev_size > len(ranked) // 2:
        raise UserError(
            f"task.dev_size={dev_size} would take {min(dev_size, len(ranked))} of the {len(ranked)} distinct "
            f"training prompts for the dev split. Lower it (e.g. task.dev_size={max(len(ranked) // 10, 1)}) "
            "or give dev its own data (task.sources.dev.path=FILE)."
        )
    dev_keys = set(ranked[:dev_size])
    first = {}  # hash -> the first sample with it (a duplicated dev prompt is evaluated once)
    for h, s in zip(keys, train):
        first.setdefault(h, s)
    return [s for h, s in zip(keys, train) if h not in dev_keys], [first[h] for h in ranked[:dev_size]]


def check_disjoint(train: list[Sample], held_out: dict[str, list[Sample]]) -> list[Sample]:
    """Refuse held-out splits that share prompts with training (they would measure memorised rows);
    a stray duplicate or two (<= 1% of the split, as real hub datasets have) leaves training instead.
    Returns the training set to use."""
    train_keys = {question_hash(s.prompt) for s in train}
    dropped: set[str] = set()
    for split, samples in held_out.items():
        shared = {question_hash(s.prompt) for s in samples} & train_keys
        if not shared:
            continue
        if len(shared) > max(0.01 * len(samples), 1):
            example = next(s.prompt for s in samples if question_hash(s.prompt) in shared)
            raise UserError(
                f"The {split!r} split shares {len(shared)} of its {len(samples)} prompts with the training "
                f"rows (e.g. {example.strip()[:80]!r}), so its numbers would measure memorised rows. Give "
                f"{split} its own data (task.sources.{split}.path=FILE or a hub split), or evaluate on dev, "
                "which is carved out of the training rows (eval.split=dev)."
            )
        dropped |= shared
    if dropped:
        note(f"{len(dropped)} training prompt(s) also appear in a held-out split; they were left out of training.")
    return [s for s in train if question_hash(s.prompt) not in dropped] if dropped else train


def drop_long_prompts(
    samples: list[Sample], tokenizer: Any, limit: int, where: str, max_fraction: float, advice: Any = None
) -> list[Sample]:
    """The samples whose prompt fits in `limit` tokens; the rest are named in a note, and refused when they
    are more than `max_fraction` of the split (then the limit, not the data, is probably wrong).
    advice(needed): the fix, given the limit that would keep enough prompts (None: no limit would)."""
    # A token is rarely more than 64 characters: longer prompts are dropped without tokenizing megabytes.
    short = [i for i, s in enumerate(samples) if len(s.prompt) <= 64 * limit]
    lengths = dict(
        zip(short, map(len, tokenizer([samples[i].prompt for i in short], add_special_tokens=False)["input_ids"]))
    )
    long = [i for i in range(len(samples)) if lengths.get(i, limit + 1) > limit]
    if not long:
        return samples
    rows = [samples[i].meta.get("row", i) for i in long]
    if len(long) > max_fraction * len(samples):
        needed = needed_limit(lengths, len(samples), max_fraction)
        fix = advice(needed) if advice else f"Raise train.max_prompt_tokens (to {needed}) or shorten the prompts."
        raise UserError(
            f"{where}: {len(long)} of {len(samples)} prompts are longer than {limit} tokens (rows {rows[:8]}). {fix}"
        )
    note(f"{where}: skipped {len(long)} prompt(s) longer than {limit} tokens (rows {rows[:8]}).")
    skip = set(long)
    return [s for i, s in enumerate(samples) if i not in skip]


def needed_limit(lengths: dict[int, int], n: int, max_fraction: float) -> int | None:
    """The smallest prompt limit that skips at most `max_fraction` of `n` prompts (`lengths`: the measured ones;
    the rest count as too long for any limit). Example: lengths 10, 20, 30, 40, max_fraction 0.25 -> 30."""
    keep = n - int(max_fraction * n)
    known = sorted(lengths.values())
    return known[keep - 1] if 0 < keep <= len(known) else None
