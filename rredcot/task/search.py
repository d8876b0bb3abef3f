"""The built-in search task (`task=search`): find the x that satisfies a condition by trying candidates.

    prompt:      "x*3+4=19. x=?\n"
    completion:  "<think>\n2*3+4=10\n7*3+4=25\n5*3+4=19\nso x=5\n</think>\n5</s>"

One candidate per line (at most `max_tries`), in an order the trace chooses, until one meets the
target; then a line that
states it, the marker and the answer. Unlike the chain task, whose answer is the value the last line
computes, here the answer is known part-way: at the line whose result equals the target, usually well
before the end of a long search, and a model may guess it earlier still. That is the shape of real
reasoning traces the method is built for (try, find, confirm), where forced-answer values can move
mid-trace; the chain task stays as the hard case.

Warm-start flaws make a wrong check ruin the trace: a candidate's check is a fact "c*a+b" that the data
(for a hash-chosen `misconception_frac` of facts, `misconception_rate` of the time) writes as equal to
the target, so the trace stops there and answers a wrong x; `rate` adds one random slip in some
candidate line (noise that usually changes nothing, or ends the search early on a wrong x).
Splits are disjoint by prompt hash, as in the chain task.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from rredcot.ranges import COUNT, NATURAL, integer
from rredcot.registry import register
from rredcot.task.arith import THINK_CLOSE, THINK_OPEN, Flaws, misconception, split_of
from rredcot.types import Sample


@dataclass(frozen=True)
class SearchSpec:
    max_x: int = 29  # the answer and every candidate are in [0, max_x]
    max_a: int = 9  # the multiplier a is in [2, max_a]
    max_b: int = 99  # the offset b is in [0, max_b]
    max_tries: int = 6  # candidate lines in a reference trace, the answer's included


@dataclass(frozen=True)
class Problem:
    x: int
    a: int
    b: int
    order: tuple[int, ...]  # the candidates in the order the reference trace tries them; ends with x

    @property
    def target(self) -> int:
        return self.x * self.a + self.b

    @property
    def prompt(self) -> str:
        return f"x*{self.a}+{self.b}={self.target}. x=?\n"


def make_problem(rng: random.Random, spec: SearchSpec) -> Problem:
    """A condition and a search order: the wrong candidates tried first are a random subset, so the
    answer turns up anywhere from the first line to the last."""
    x, a, b = rng.randint(0, spec.max_x), rng.randint(2, spec.max_a), rng.randint(0, spec.max_b)
    others = [c for c in range(spec.max_x + 1) if c != x]
    rng.shuffle(others)
    return Problem(x, a, b, tuple(others[: rng.randint(0, min(spec.max_tries - 1, len(others)))]) + (x,))


def trace_text(p: Problem, flaws: Flaws = Flaws(), rng: random.Random | None = None) -> str:
    """The worked search; with `flaws`, a wrong candidate can pass its check and end it (see module doc)."""
    rng = rng or random.Random(0)
    slip = rng.randrange(len(p.order)) if rng.random() < flaws.rate else None
    lines, found = [], p.x
    for i, c in enumerate(p.order):
        y = c * p.a + p.b
        if c != p.x and misconception(c, f"*{p.a}+", p.b, flaws.misconception_frac) is not None \
                and rng.random() < flaws.misconception_rate:
            y = p.target  # the check a flawed fact gets wrong: a wrong x "meets" the target
        elif i == slip:
            y += rng.choice([-2, -1, 1, 2])
        lines.append(f"{c}*{p.a}+{p.b}={y}")
        if y == p.target:
            found = c
            break
    lines.append(f"so x={found}")
    return f"{THINK_OPEN}\n" + "\n".join(lines) + f"\n{THINK_CLOSE}\n{found}"


def generate(spec: SearchSpec, split: str, n: int, seed: int, flaws: Flaws = Flaws()) -> list[Sample]:
    """`n` distinct problems of `split`; the same seed gives the same list. meta["trace"]: the worked search
    (flawed only with `flaws`, for the warm start)."""
    from rredcot.task.arith import _SPLIT_BUCKETS

    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_BUCKETS)}, got {split!r}")
    rng = random.Random(f"search-{seed}-{split}")
    out: list[Sample] = []
    seen: set[str] = set()
    for _ in range(200 * n + 10_000):
        if len(out) == n:
            return out
        p = make_problem(rng, spec)
        if p.prompt in seen or split_of(p.prompt) != split:
            continue  # the prompt decides the split, so a problem never crosses splits whatever its order
        seen.add(p.prompt)
        trace = trace_text(p, flaws, rng)
        out.append(Sample(prompt=p.prompt, gold=str(p.x), meta={"trace": trace, "flawed": not trace.endswith("\n" + str(p.x)),
                                                                "candidates_before_answer": len(p.order) - 1}))
    if len(out) < n:  # few distinct conditions: (max_x + 1) x (max_a - 1) x (max_b + 1) per split share
        distinct = (spec.max_x + 1) * (spec.max_a - 1) * (spec.max_b + 1)
        raise ValueError(f"{split}: only {len(out)} distinct problems of {n} ({distinct} conditions in all, ~10% per "
                         "held-out split); raise task.max_x, max_a or max_b, or lower the sizes")
    return out


def spec_of(cfg: Any) -> SearchSpec:
    return SearchSpec(max_x=cfg.max_x, max_a=cfg.max_a, max_b=cfg.max_b, max_tries=cfg.max_tries)


@register("task", "search", {"max_x": integer(1, 999), "max_a": integer(2, 99), "max_b": NATURAL, "max_tries": COUNT,
                             "train_size": COUNT, "eval_size": COUNT, "seed": NATURAL})
def search_task(cfg: Any, split: str, tokenizer: Any = None) -> list[Sample]:
    """`split` is train / dev / test; sizes from cfg.train_size and cfg.eval_size."""
    return generate(spec_of(cfg), split, cfg.train_size if split == "train" else cfg.eval_size, seed=cfg.seed)


def _warmstart(cfg: Any, tokenizer: Any = None) -> list[Sample]:
    ws = cfg.warmstart
    return generate(spec_of(cfg.task), "train", ws.examples, seed=ws.seed,
                    flaws=Flaws(ws.flaw_rate, ws.misconception_frac, ws.misconception_rate))


search_task.warmstart_samples = _warmstart
