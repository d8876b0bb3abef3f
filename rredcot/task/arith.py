"""The built-in task: multi-step arithmetic chains, made from a seed (no download).

A problem defines a chain of dependent variables; the answer is the last one:

    prompt:      "a=3, b=a+4, c=b*2. c=?\n"
    completion:  "<think>\nb=3+4=7\nc=7*2=14\n</think>\n14</s>"

The thinking part is one line per step, closed by the end-of-thinking marker, then the answer, so
answer forcing and segmentation work here exactly as on a real reasoning model. Each line depends on
the previous one: one wrong step ruins the answer. `distractors` adds assignments that are not on the
chain (the model must skip them); `shuffle` lists the definitions out of order.

Splits are disjoint by construction: a problem belongs to the split chosen by a hash of its prompt.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import dataclass

from rredcot.types import Sample

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# 10 hash buckets: 0 -> test (held-out), 1 -> dev (for choosing settings), 2..9 -> train.
_SPLIT_BUCKETS = {"test": {0}, "dev": {1}, "train": set(range(2, 10))}


@dataclass(frozen=True)
class ArithSpec:
    """Difficulty knobs of the built-in task."""

    steps: int = 4  # dependent operations on the chain
    max_value: int = 20  # every value on the chain stays in [0, max_value]
    max_operand: int = 9  # right-hand constants are in [1, max_operand]
    ops: str = "+-*"
    distractors: int = 0  # extra assignments that do not feed the answer
    shuffle: bool = False  # list definitions out of order


@dataclass(frozen=True)
class Step:
    var: str
    src: str
    op: str
    k: int
    value: int


def _apply(op: str, x: int, k: int) -> int:
    return x + k if op == "+" else x - k if op == "-" else x * k


def _random_step(rng: random.Random, spec: ArithSpec, src: str, x: int, var: str) -> Step:
    # Rejection-sample an operation whose result stays in range; "+1" always fits unless x is the
    # maximum, and "-1" then does, so this terminates.
    while True:
        op = rng.choice(spec.ops)
        k = rng.randint(2, 3) if op == "*" else rng.randint(1, spec.max_operand)
        y = _apply(op, x, k)
        if 0 <= y <= spec.max_value:
            return Step(var, src, op, k, y)


def make_problem(rng: random.Random, spec: ArithSpec) -> tuple[int, list[Step], list[str]]:
    """A chain (start value, steps) and the prompt's definition strings in display order."""
    names = rng.sample(string.ascii_lowercase, spec.steps + 1 + 2 * spec.distractors)
    start = rng.randint(0, spec.max_value)
    steps, x = [], start
    for i in range(spec.steps):
        step = _random_step(rng, spec, names[i], x, names[i + 1])
        steps.append(step)
        x = step.value
    defs = [f"{names[0]}={start}"] + [f"{s.var}={s.src}{s.op}{s.k}" for s in steps]
    extra = names[spec.steps + 1 :]
    for i in range(spec.distractors):  # pairs "p=5", "q=p+2": plausible but off the chain
        base, dep = extra[2 * i], extra[2 * i + 1]
        v = rng.randint(0, spec.max_value)
        d = _random_step(rng, spec, base, v, dep)
        defs.insert(rng.randint(0, len(defs)), f"{base}={v}")
        defs.insert(rng.randint(defs.index(f"{base}={v}") + 1, len(defs)), f"{dep}={base}{d.op}{d.k}")
    if spec.shuffle:
        rng.shuffle(defs)
    return start, steps, defs


def prompt_text(defs: list[str], query: str) -> str:
    return ", ".join(defs) + f". {query}=?\n"


@dataclass(frozen=True)
class Flaws:
    """How the warm-start traces go wrong (the RL stage's job is to undo it).

    - `rate`: fraction of traces with one random wrong step (noise around the right answer).
    - `misconception_frac`: fraction of arithmetic facts "x op k" (chosen by a hash) that the data
      gets systematically wrong, writing a fixed wrong result `misconception_rate` of the time.
      Above 0.5 the imitating model's most likely (greedy) result for such a fact is wrong.
    """

    rate: float = 0.0
    misconception_frac: float = 0.0
    misconception_rate: float = 0.0


def misconception(x: int, op: str, k: int, frac: float) -> int | None:
    """The fixed wrong offset of a confusable fact, or None. Example: most facts -> None."""
    h = int(hashlib.sha256(f"{x}{op}{k}".encode()).hexdigest(), 16)
    if (h % 10_000) / 10_000 >= frac:
        return None
    return (1, -1, 2, -2)[(h // 10_000) % 4]


def trace_text(start: int, steps: list[Step], flaws: Flaws = Flaws(), rng: random.Random | None = None) -> str:
    """The worked solution; with `flaws` (and an rng), some results are wrong and errors propagate."""
    rng = rng or random.Random(0)
    noisy_step = rng.randrange(len(steps)) if rng.random() < flaws.rate else None
    lines, x = [], start
    for i, s in enumerate(steps):
        y = _apply(s.op, x, s.k)
        off = misconception(x, s.op, s.k, flaws.misconception_frac)
        if off is not None and rng.random() < flaws.misconception_rate:
            y += off
        elif i == noisy_step:
            y += rng.choice([-3, -2, -1, 1, 2, 3])
        lines.append(f"{s.var}={x}{s.op}{s.k}={y}")
        x = y
    return f"{THINK_OPEN}\n" + "\n".join(lines) + f"\n{THINK_CLOSE}\n{x}"


def solution_of(trace: str, gold: str) -> str | None:
    """The reasoning of a right worked trace, as the reference-solution bank reads it (stages/bank.py): its
    thinking lines, each ended by a line break; None for a trace whose answer is not the gold.
    Example: '<think>\na=1\nb=a+1=2\n</think>\n2', gold '2' -> 'a=1\nb=a+1=2\n'."""
    if not trace.endswith("\n" + gold) or THINK_CLOSE not in trace:
        return None
    body = trace[: trace.rfind(THINK_CLOSE)]
    return body[len(THINK_OPEN) :].lstrip("\n") if body.startswith(THINK_OPEN) else body


def split_of(prompt: str) -> str:
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 10
    return next(name for name, b in _SPLIT_BUCKETS.items() if bucket in b)


def generate(spec: ArithSpec, split: str, n: int, seed: int, flaws: Flaws = Flaws()) -> list[Sample]:
    """`n` distinct problems of `split` ("train", "dev", "test"); the same seed gives the same list.

    Each Sample carries a worked trace in meta["trace"]: correct, unless `flaws` (used only for the
    supervised warm start) makes some of its steps wrong.
    """
    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_BUCKETS)}, got {split!r}")
    rng = random.Random(f"{seed}-{split}")
    out: list[Sample] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"could not make {n} distinct {split} problems with {spec}; make the task larger")
        start, steps, defs = make_problem(rng, spec)
        prompt = prompt_text(defs, steps[-1].var)
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        trace = trace_text(start, steps, flaws, rng)
        gold = str(steps[-1].value)
        meta = {"trace": trace, "flawed": not trace.endswith("\n" + gold), "solution": solution_of(trace, gold)}
        out.append(Sample(prompt=prompt, gold=gold, meta=meta))
    return out


_ANSWER = re.compile(r"-?\d+")


def extract_answer(completion: str) -> tuple[str | None, str]:
    """(answer, extractor): the first integer after the last end-of-thinking marker."""
    if THINK_CLOSE not in completion:
        return None, "none"
    m = _ANSWER.search(completion.rsplit(THINK_CLOSE, 1)[1])
    return (m.group(0), "after_think") if m else (None, "none")
