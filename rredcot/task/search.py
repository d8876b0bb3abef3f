"""The built-in search task (`task=search`): which of the listed candidates satisfies the condition?

    prompt:      "x*3+4=19. x in 2,7,5,8? x=?\n"
    completion:  "<think>\n2*3+4=10 no\n7*3+4=25 no\n5*3+4=19 yes\nso x=5\n</think>\n5</s>"

The trace checks the candidates in the order listed, one per line with a verdict, stops at the first
that meets the target, states it, then the marker and the answer. Unlike the chain task, whose answer
is the value its last line computes, the answer here is known part-way: at the "yes" line, which
comes anywhere from the first candidate to the last. That is the shape of real reasoning traces the
method is built for (try, find, confirm), where forced-answer values can move mid-trace; the chain
task stays as the hard case.

Warm-start flaws make a wrong check ruin the trace: for a hash-chosen `misconception_frac` of the facts
"c*a+b", the data (`misconception_rate` of the time) writes a wrong candidate as meeting the target
("=19 yes"), and the trace answers it; `rate` adds a slip to one line's result (usually harmless, or
a missed answer, and the trace then states the last candidate). Splits are disjoint by prompt hash.
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
    max_x: int = 9  # the answer and every candidate are in [0, max_x]
    max_a: int = 4  # the multiplier a is in [2, max_a]
    max_b: int = 9  # the offset b is in [0, max_b]
    candidates: int = 5  # listed in the prompt, the answer among them at a random place


@dataclass(frozen=True)
class Problem:
    x: int
    a: int
    b: int
    order: tuple[int, ...]  # the listed candidates, the answer among them

    @property
    def target(self) -> int:
        return self.x * self.a + self.b

    @property
    def prompt(self) -> str:
        return f"x*{self.a}+{self.b}={self.target}. x in {','.join(map(str, self.order))}? x=?\n"


def make_problem(rng: random.Random, spec: SearchSpec) -> Problem:
    """A condition and `candidates` distinct values that include its only solution, in random order."""
    x, a, b = rng.randint(0, spec.max_x), rng.randint(2, spec.max_a), rng.randint(0, spec.max_b)
    listed = rng.sample([c for c in range(spec.max_x + 1) if c != x], spec.candidates - 1) + [x]
    rng.shuffle(listed)
    return Problem(x, a, b, tuple(listed))


def trace_text(p: Problem, flaws: Flaws = Flaws(), rng: random.Random | None = None) -> str:
    """The worked check; with `flaws`, a wrong candidate can pass its check and end it (see module doc)."""
    rng = rng or random.Random(0)
    slip = rng.randrange(len(p.order)) if rng.random() < flaws.rate else None
    lines, found = [], p.order[-1]
    for i, c in enumerate(p.order):
        y = c * p.a + p.b
        if (
            c != p.x
            and misconception(c, f"*{p.a}+", p.b, flaws.misconception_frac) is not None
            and rng.random() < flaws.misconception_rate
        ):
            y = p.target  # the check a flawed fact gets wrong: a wrong x "meets" the target
        elif i == slip:
            y += rng.choice([-2, -1, 1, 2])
        lines.append(f"{c}*{p.a}+{p.b}={y} {'yes' if y == p.target else 'no'}")
        if y == p.target:
            found = c
            break
    lines.append(f"so x={found}")
    return f"{THINK_OPEN}\n" + "\n".join(lines) + f"\n{THINK_CLOSE}\n{found}"


def generate(spec: SearchSpec, split: str, n: int, seed: int, flaws: Flaws = Flaws()) -> list[Sample]:
    """`n` distinct problems of `split`; the same seed gives the same list. meta["trace"]: the worked search
    (flawed only with `flaws`, for the warm start)."""
    from rredcot.task.arith import _SPLIT_BUCKETS, solution_of

    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_BUCKETS)}, got {split!r}")
    rng = random.Random(f"search-{seed}-{split}")
    out: list[Sample] = []
    seen: set[str] = set()
    for _ in range(200 * n + 10_000):
        if len(out) == n:
            break
        p = make_problem(rng, spec)
        if p.prompt in seen or split_of(p.prompt) != split:
            continue  # the prompt decides the split, so a problem never crosses splits whatever its order
        seen.add(p.prompt)
        trace = trace_text(p, flaws, rng)
        out.append(
            Sample(
                prompt=p.prompt,
                gold=str(p.x),
                meta={
                    "trace": trace,
                    "flawed": not trace.endswith("\n" + str(p.x)),
                    "answer_at": p.order.index(p.x),
                    "solution": solution_of(trace, str(p.x)),
                },
            )
        )
    if len(out) < n:
        raise ValueError(
            f"{split}: only {len(out)} distinct problems of {n} with {spec}; raise task.max_x, max_a, max_b "
            "or candidates, or lower the sizes"
        )
    return out


def spec_of(cfg: Any) -> SearchSpec:
    return SearchSpec(max_x=cfg.max_x, max_a=cfg.max_a, max_b=cfg.max_b, candidates=cfg.candidates)


def _check(cfg: Any, prefix: str) -> None:
    from rredcot.errors import UserError

    if cfg.candidates > cfg.max_x + 1:
        raise UserError(
            f"{prefix}candidates={cfg.candidates} distinct values do not fit in [0, {prefix}max_x={cfg.max_x}]: "
            f"keep candidates <= max_x + 1."
        )


def _warmstart(cfg: Any, tokenizer: Any = None) -> list[Sample]:
    ws = cfg.warmstart
    return generate(
        spec_of(cfg.task),
        "train",
        ws.examples,
        seed=ws.seed,
        flaws=Flaws(ws.flaw_rate, ws.misconception_frac, ws.misconception_rate),
    )


@register(
    "task",
    "search",
    {
        "max_x": integer(1, 999),
        "max_a": integer(2, 99),
        "max_b": NATURAL,
        "candidates": integer(2),
        "train_size": COUNT,
        "eval_size": COUNT,
        "seed": NATURAL,
    },
    check=_check,
    warmstart=_warmstart,
)
def search_task(cfg: Any, split: str, tokenizer: Any = None) -> list[Sample]:
    """`split` is train / dev / test; sizes from cfg.train_size and cfg.eval_size."""
    return generate(spec_of(cfg), split, cfg.train_size if split == "train" else cfg.eval_size, seed=cfg.seed)
