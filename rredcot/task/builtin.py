"""The built-in task: arithmetic chains made from a seed (rredcot.task.arith), split by prompt hash, with its
own warm-start traces (some flawed on purpose). Registered as task `builtin`."""

from __future__ import annotations

from typing import Any

from rredcot.errors import UserError
from rredcot.ranges import COUNT, NATURAL, Rule, integer
from rredcot.registry import register
from rredcot.task.arith import ArithSpec, Flaws, generate
from rredcot.types import Sample


def arith_spec(cfg: Any) -> ArithSpec:
    return ArithSpec(
        steps=cfg.steps,
        max_value=cfg.max_value,
        max_operand=cfg.max_operand,
        ops=cfg.ops,
        distractors=cfg.distractors,
        shuffle=cfg.shuffle,
    )


# "+-*" minus what would leave a chain stuck: from 0 only "+" or "*" go on, from max_value only "-" or "*"(0).
_OPS = Rule(
    lambda v: isinstance(v, str) and v != "" and set(v) <= set("+-*") and "-" in v and ("+" in v or "*" in v),
    "operators from '+-*' with '-' and at least one of '+', '*' (else a chain can get stuck at 0 or at max_value)",
)
BUILTIN_RULES = {
    "steps": integer(1, 25),
    "max_value": COUNT,
    "max_operand": COUNT,
    "ops": _OPS,
    "distractors": NATURAL,
    "train_size": COUNT,
    "eval_size": COUNT,
    "seed": NATURAL,
}


def _check_builtin(cfg: Any, prefix: str) -> None:
    names = cfg.steps + 1 + 2 * cfg.distractors  # one letter per variable
    if names > 26:
        raise UserError(
            f"{prefix}steps={cfg.steps} and {prefix}distractors={cfg.distractors} need {names} variable names, "
            f"but there are 26 letters: keep steps + 1 + 2 x distractors <= 26."
        )


def _builtin_warmstart(cfg: Any, tokenizer: Any = None) -> list[Sample]:
    """The built-in task writes its own warm-start traces, some flawed on purpose (see task.warmstart)."""
    ws = cfg.warmstart
    flaws = Flaws(ws.flaw_rate, ws.misconception_frac, ws.misconception_rate)
    return generate(arith_spec(cfg.task), "train", ws.examples, seed=ws.seed, flaws=flaws)


@register("task", "builtin", BUILTIN_RULES, check=_check_builtin, warmstart=_builtin_warmstart)
def builtin_task(cfg: Any, split: str, tokenizer: Any = None) -> list[Sample]:
    """`split` is train / dev / test; sizes come from cfg.train_size and cfg.eval_size."""
    n = cfg.train_size if split == "train" else cfg.eval_size
    return generate(arith_spec(cfg), split, n, seed=cfg.seed)
