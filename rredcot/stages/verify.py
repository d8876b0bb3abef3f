"""Verify stage: plain functions (completion, sample, **options) -> Score, tested with string tables.

A Score's reward is 1.0 / 0.0, or None when it is undefined (unparseable gold: the row is skipped,
never rewarded). `extractor` names the rule that found the answer, so logs can say which fired.
"""
from __future__ import annotations

import math
import re
import threading
from functools import partial
from typing import Any, Callable, NamedTuple

import torch

from rredcot.registry import get, register
from rredcot.task.arith import THINK_CLOSE, extract_answer
from rredcot.types import Sample, Verified


class Score(NamedTuple):
    reward: float | None
    extractor: str


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")
_STRICT = re.compile(r"####\s*(-?[$\d,]*\.?\d+)")


def normalize_number(text: str) -> float | None:
    """'1,234.50' -> 1234.5, '$18.' -> 18.0, 'abc' -> None."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def _same_number(pred: str | None, gold: str) -> float | None:
    g = normalize_number(gold)
    if g is None or math.isnan(g):
        return None
    p = normalize_number(pred) if pred is not None else None
    return float(p is not None and math.isclose(p, g, rel_tol=0, abs_tol=1e-6))


@register("verify", "builtin")
def verify_builtin(completion: str, sample: Sample) -> Score:
    """The built-in task: the integer after the end-of-thinking marker equals the gold."""
    answer, extractor = extract_answer(completion)
    return Score(_same_number(answer, sample.gold), extractor)


def extract_gsm8k(completion: str, mode: str = "flexible") -> tuple[str | None, str]:
    """`strict`: the last '#### <number>'; `flexible`: that, else the last number in the text."""
    strict = _STRICT.findall(completion)
    if strict:
        return strict[-1], "strict"
    if mode == "flexible":
        nums = _NUMBER.findall(completion)
        if nums:
            return nums[-1], "flexible"
    return None, "none"


@register("verify", "gsm8k")
def verify_gsm8k(completion: str, sample: Sample, mode: str = "flexible") -> Score:
    """GSM8K: sample.gold is the text after '####' with commas removed (see task.datasets)."""
    if mode not in ("strict", "flexible"):
        raise ValueError(f"gsm8k verify mode must be 'strict' or 'flexible', got {mode!r}")
    answer, extractor = extract_gsm8k(completion, mode)
    return Score(_same_number(answer, sample.gold), extractor)


@register("verify", "math")
def verify_math(completion: str, sample: Sample) -> Score:
    """MATH-style answers through math-verify: verify(gold, pred), gold first (it is not symmetric).

    math-verify's timeouts use SIGALRM, which only works on the main thread; elsewhere they are off
    (the caller bounds the time). Gold that does not parse gives reward None: the row is skipped.
    """
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse("\\boxed{" + sample.gold + "}", parsing_timeout=timeout)
    if not gold:
        return Score(None, "unparseable_gold")
    pred = parse(completion, parsing_timeout=timeout)
    if not pred:
        return Score(0.0, "none")
    return Score(float(verify(gold, pred, timeout_seconds=timeout)), "math_verify")


@register("verify", "format")
def verify_format(completion: str, sample: Sample) -> Score:
    """Format reward: a closed thinking part followed by a non-empty answer."""
    head, sep, tail = completion.partition(THINK_CLOSE)
    return Score(float(bool(sep) and bool(head.strip()) and bool(tail.strip())), "format")


def answer_extractor(cfg: Any) -> Callable[[str], str | None]:
    """The final-answer text of a completion, as the task's verifier reads it (for answer forcing)."""
    from rredcot.task.datasets import gold_from

    if cfg.name == "builtin":
        return lambda text: extract_answer(text)[0]
    if cfg.name == "gsm8k":
        mode = dict(cfg.options or {}).get("mode", "flexible")
        return lambda text: extract_gsm8k(text, mode)[0]
    return lambda text: gold_from(text, "boxed") or None


def build_reward_funcs(cfg: Any) -> dict[str, tuple[Callable[[str, Sample], Score], float]]:
    """name -> (verifier with its options bound, weight). 'accuracy' is the task's own verifier."""
    funcs = {"accuracy": (partial(get("verify", cfg.name), **dict(cfg.options or {})), float(cfg.weight))}
    if cfg.format_weight:
        funcs["format"] = (get("verify", "format"), float(cfg.format_weight))
    return funcs


def run_verify(texts: list[str], samples: list[Sample], funcs: dict[str, tuple[Callable, float]]) -> Verified:
    """Score N completions. The total is the weighted sum; undefined accuracy makes the row NaN."""
    per_func: dict[str, torch.Tensor] = {}
    extractor: list[str] = []
    for name, (fn, _) in funcs.items():
        scores = [fn(t, s) for t, s in zip(texts, samples)]
        per_func[name] = torch.tensor([math.nan if sc.reward is None else sc.reward for sc in scores])
        if name == "accuracy":
            extractor = [sc.extractor for sc in scores]
    total = sum(w * per_func[name] for name, (_, w) in funcs.items())
    return Verified(rewards=total, per_func=per_func, correct=per_func["accuracy"] == 1.0, extractor=extractor)
