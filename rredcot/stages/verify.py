"""Verify stage: a verifier is one registered object that says how to find a completion's final answer
and how to judge one answer against the gold, so nothing else ever decides by a verifier's *name*.

    v = get("verify", "gsm8k")(mode="strict")   # options from verify.options
    v.extract("... #### 18")      -> ("18", "strict")       the answer text, and which rule found it
    v.judge("18", sample)         -> 1.0                    1.0 / 0.0, or None when the gold is unparseable
    v("... #### 18", sample)      -> Score(1.0, "strict")   the reward of a whole completion

Answer forcing (RREDCoT's values) scores candidate answers with `judge`, never by verifying a
synthetic completion, so a strict verifier cannot silently turn every utility into 0. A reward of None
means undefined (the row is skipped, never rewarded). Tested with string tables (tests/unit/test_verify.py).
TRL-style reward functions (plain callables, called per batch) join them: stages/reward_funcs.py.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rredcot.errors import UserError
from rredcot.registry import get, register
from rredcot.stages import guard
from rredcot.stages.contract import Checked
from rredcot.stages.contract import check_golds as check_golds  # re-exported: its callers import it from here
from rredcot.stages.guard import CRASHED, OVER_BUDGET, TIMEOUT, Guarded, run_guarded
from rredcot.stages.reward_funcs import RewardCallable, build_callables, run_callables
from rredcot.stages.shaping import NAME as OVERLONG
from rredcot.task.arith import THINK_CLOSE, extract_answer
from rredcot.types import Sample, Score, Verified
from rredcot.ui import note


class Verifier:
    """Base class: subclasses define `extract` and `judge`; `__call__` scores a whole completion.

    Invariant (tested for every registered verifier): v(c, s).reward == v.judge(v.extract(c)[0], s)
    wherever a subclass does not document otherwise.

    `judges_gold`: judge(sample.gold, sample) == 1 for a well-formed row; runs check it at start-up
    (check_golds). A verifier whose gold is not an answer (unit tests for code, say) sets it False.
    """

    judges_gold = True

    def extract(self, completion: str) -> tuple[str | None, str]:
        """(final answer text or None, name of the rule that found it; "none" when nothing did)."""
        raise NotImplementedError

    def judge(self, answer: str | None, sample: Sample) -> float | None:
        """1.0 if `answer` is right for `sample`, 0.0 if not (or None), None if the gold cannot be judged."""
        raise NotImplementedError

    def __call__(self, completion: str, sample: Sample) -> Score:
        answer, how = self.extract(completion)
        return Score(self.judge(answer, sample), how)


_NUMBER = re.compile(r"-?[\d,]{0,64}\.?\d+")
# Bounded repetition: an unbounded [\d,]* is quadratic on a long run of commas.
_STRICT = re.compile(r"####\s{0,20}(-?\$?[\d,]{0,40}\.?\d{1,40})")


def normalize_number(text: str) -> float | None:
    """'1,234.50' -> 1234.5, '$18.' -> 18.0, 'abc' -> None."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def same_number(pred: str | None, gold: str) -> float | None:
    """1.0 / 0.0 by numeric equality; None when the gold is not a number (undefined, not wrong)."""
    g = normalize_number(gold)
    if g is None or math.isnan(g):
        return None
    p = normalize_number(pred) if pred is not None else None
    return float(p is not None and math.isclose(p, g, rel_tol=0, abs_tol=1e-6))


@register("verify", "builtin")
class BuiltinVerifier(Verifier):
    """The built-in task: the integer after the last end-of-thinking marker equals the gold."""

    def extract(self, completion: str) -> tuple[str | None, str]:
        return extract_answer(completion)

    def judge(self, answer: str | None, sample: Sample) -> float | None:
        return same_number(answer, sample.gold)


@register("verify", "gsm8k")
class GSM8KVerifier(Verifier):
    """GSM8K: sample.gold is the text after '####' with commas removed (see task/hub.py).

    `strict`: the last '#### <number>'; `flexible`: that, else the last number in the text."""

    def __init__(self, mode: str = "flexible"):
        if mode not in ("strict", "flexible"):
            raise UserError(f"verify.options.mode={mode!r}: the gsm8k verifier's mode is 'strict' or 'flexible'.")
        self.mode = mode

    def extract(self, completion: str) -> tuple[str | None, str]:
        strict = _STRICT.findall(completion)
        if strict:
            return strict[-1], "strict"
        if self.mode == "flexible":
            nums = _NUMBER.findall(completion)
            if nums:
                return nums[-1], "flexible"
        return None, "none"

    def judge(self, answer: str | None, sample: Sample) -> float | None:
        return same_number(answer, sample.gold)


def _math_timeout() -> int | None:
    # math-verify's own timeouts use SIGALRM, which only works on the main thread; elsewhere they are off.
    # In a guard worker the worker's hard timeout holds instead (stages/guard.py).
    return 5 if threading.current_thread() is threading.main_thread() and not guard.IN_WORKER else None


@register("verify", "math")
class MathVerifier(Verifier):
    """MATH-style answers through math-verify: verify(gold, pred), gold first (it is not symmetric).

    `extract` is math-verify's own extraction (boxed, then other LaTeX/expressions); `judge` parses the
    candidate as `\\boxed{answer}`. Gold that does not parse makes the reward None (row skipped)."""

    def __init__(self) -> None:
        # math-verify logs each timed-out completion in full at WARNING; timeouts are counted in the metrics.
        logging.getLogger("math_verify").setLevel(logging.ERROR)

    def extract(self, completion: str) -> tuple[str | None, str]:
        from math_verify import parse

        found = parse(completion, parsing_timeout=_math_timeout())
        return (str(found[-1]), "math_verify") if found else (None, "none")

    @staticmethod
    def _score(gold_text: str, pred_text: str | None) -> tuple[float | None, str]:
        """(reward, extractor): the gold parsed as \\boxed{gold}, the prediction parsed as given."""
        from math_verify import parse, verify

        timeout = _math_timeout()
        gold = parse("\\boxed{" + gold_text + "}", parsing_timeout=timeout)
        if not gold:
            return None, "unparseable_gold"
        pred = parse(pred_text, parsing_timeout=timeout) if pred_text else []
        if not pred:
            return 0.0, "none"
        return float(verify(gold, pred, timeout_seconds=timeout)), "math_verify"

    def judge(self, answer: str | None, sample: Sample) -> float | None:
        return self._score(sample.gold, "\\boxed{" + answer + "}" if answer else None)[0]

    def __call__(self, completion: str, sample: Sample) -> Score:
        # The completion is parsed as a whole (math-verify's richer extraction), not re-boxed.
        return Score(*self._score(sample.gold, completion))


@register("verify", "format")
class FormatVerifier(Verifier):
    """Format reward: a non-empty thinking part closed by the marker, then a non-empty answer."""

    def extract(self, completion: str) -> tuple[str | None, str]:
        head, sep, tail = completion.partition(THINK_CLOSE)
        ok = bool(sep) and bool(head.strip()) and bool(tail.strip())
        return (tail.strip(), "format") if ok else (None, "format")

    def judge(self, answer: str | None, sample: Sample) -> float | None:
        return float(bool(answer))


def build_verifier(name: str, options: Any = None, key: str = "verify.name") -> Verifier:
    """The registered verifier `name` with its options (a bad option is a UserError naming it)."""
    cls = get("verify", name, key)
    try:
        verifier = cls(**dict(options or {}))
    except TypeError as e:
        raise UserError(
            f"verify.options={dict(options or {})} do not fit the {name!r} verifier: {e}. "
            "Remove the unknown option (`rredcot list` names the verifiers)."
        ) from None
    if not isinstance(verifier, Verifier):
        raise UserError(
            f"verify entry {name!r} is not a rredcot.stages.verify.Verifier subclass: a verifier must say "
            "how to extract an answer (extract) and how to judge one (judge)."
        )
    return verifier


@dataclass(frozen=True)
class RewardFuncs:
    """The task's verifier (its reward decides `correct`, its extractor is logged; the value estimators extract
    and judge with it), further weighted per-completion rewards (`extra`), and TRL-style batch reward functions
    (`callables`, stages/reward_funcs.py). Logged as reward/<name>/mean, the verifier's as `accuracy`.

    Example: RewardFuncs(v, 1.0, {"format": (f, .5)}) scores a right, well-formed completion 1 * 1 + .5 * 1."""

    verifier: Verifier
    weight: float = 1.0
    extra: dict[str, tuple[Verifier, float]] = field(default_factory=dict)
    name: str = "accuracy"  # the metrics name of the verifier's reward
    callables: dict[str, tuple[RewardCallable, float]] = field(default_factory=dict)

    def items(self) -> list[tuple[str, tuple[Verifier, float]]]:
        """(name, (function, weight)) of every per-completion reward, the verifier's first."""
        return [(self.name, (self.verifier, self.weight)), *self.extra.items()]

    def weights(self) -> dict[str, float]:
        """name -> weight of every reward, the callables' too."""
        return {name: w for name, (_, w) in [*self.items(), *self.callables.items()]}

    def judged(self) -> RewardFuncs:
        """The verifier's reward alone: what `correct` needs (held-out evaluation never calls the others)."""
        return replace(self, extra={}, callables={})


def build_reward_funcs(cfg: Any) -> RewardFuncs:
    """The task's verifier (verify.name), with verify.format_weight > 0 a format reward, and the functions of
    verify.reward_funcs. With verify.timeout_s > 0 each verifier runs in a worker process under that hard
    timeout (stages/guard.py)."""
    timeout = cfg.get("timeout_s", 0)

    def guarded(name: str, options: Any = None) -> Checked:  # every call is held to the contract (contract.py)
        v = build_verifier(name, options)
        return Checked(Guarded(v, timeout) if timeout else v, name)

    extra = {"format": (guarded("format"), float(cfg.format_weight))} if cfg.format_weight else {}
    callables = build_callables(cfg, {"accuracy", *extra, OVERLONG})  # the overlong shaping's name is taken too
    return RewardFuncs(guarded(cfg.name, cfg.options), float(cfg.weight), extra, callables=callables)


_told: set[str] = set()


def _say_timeouts(name: str, scores: list[Score]) -> None:
    """One line per kind, the first time a reward function's call times out or the budget runs out."""
    for kind, what in (
        (TIMEOUT, "ran past verify.timeout_s"),
        (OVER_BUDGET, "were left unchecked past verify.budget_s"),
        (CRASHED, "ended the verifier's worker process (a crash, or the out-of-memory killer)"),
    ):
        n = sum(sc.extractor == kind for sc in scores)
        if n and kind not in _told:
            _told.add(kind)
            note(
                f"{n} completion(s) {what} in the {name} reward and scored 0; every step counts them "
                f"(metrics: extractor/{kind})."
            )


def _say_undefined(name: str, rewards: torch.Tensor) -> None:
    """Once per run: a batch whose every reward is undefined (None) teaches nothing. Said, not refused: None is
    the contract's "this row cannot be judged", and a few such rows can fill a small batch; a verifier that
    judges its gold is held to it at start-up (check_golds), and a NaN reward is refused where it is returned."""
    if len(rewards) and bool(rewards.isnan().all()) and "undefined" not in _told:
        _told.add("undefined")
        note(
            f"the {name!r} verifier's reward was undefined (None) for all {len(rewards)} completions of a batch: "
            "those rows are skipped, so nothing is learned from them (metrics: frac_reward_undefined). Its "
            "judge returns None only where a row's gold cannot be judged; check the data's gold answers."
        )


def run_verify(
    texts: list[str],
    samples: list[Sample],
    funcs: RewardFuncs,
    budget_s: float = 0.0,
    ids: list[list[int]] | None = None,
    step: int = 0,
) -> Verified:
    """Score N completions (`ids`: their token ids, `step`: the RL step, for the callables). Past `budget_s`
    seconds per verifier (0 = none), the rest score 0 as "over_budget". The total is combined by `total`."""
    per_func: dict[str, torch.Tensor] = {}
    extractor: list[str] = []
    for i, (name, (fn, w)) in enumerate(funcs.items()):
        scores = run_guarded(fn, texts, samples, budget_s)
        per_func[name] = torch.tensor([math.nan if sc.reward is None else sc.reward for sc in scores])
        if i == 0:  # the verifier's
            extractor = [sc.extractor for sc in scores]
        _say_timeouts(name, scores)
        if w or not funcs.callables:  # an unweighted verifier's None leaves the reward functions' rewards alone
            _say_undefined(getattr(fn, "name", name), per_func[name])
    per_func.update(run_callables(funcs.callables, texts, samples, ids, step))
    rewards = total(per_func, funcs.weights(), funcs.name)
    if funcs.callables and len(rewards) and bool(rewards.isnan().all()) and "all_none" not in _told:
        _told.add("all_none")  # TRL warns of the same ("All reward functions returned None")
        note(
            f"every reward was undefined (None) for all {len(rewards)} completions of a batch ({', '.join(per_func)}): "
            "those rows are skipped, so nothing is learned from them (metrics: frac_reward_undefined)."
        )
    if bool(rewards.isinf().any()):  # finite rewards past float32's range, or times a large weight
        raise UserError(
            f"The weighted rewards overflow float32 (weights {funcs.weights()}): its range ends near 3e38. "
            "Keep the rewards and their weights (verify.weight, verify.format_weight, verify.reward_weights) "
            "to sizes near 1."
        )
    return Verified(rewards=rewards, per_func=per_func, correct=per_func[funcs.name] == 1.0, extractor=extractor)


def total(per_func: dict[str, torch.Tensor], weights: dict[str, float], verifier: str) -> torch.Tensor:
    """The weighted sum, undefined (NaN) rows as TRL has them: a reward that is None adds nothing, and a row whose
    every weighted reward is None is undefined (TRL 1.16.0 trl/trainer/grpo_trainer.py,
    _generate_and_score_completions: nansum, then NaN where all are NaN, the `unscorable_mask`).
    One rule of ours on top: where the verifier is weighted, its None (a gold that cannot be judged) makes the
    row undefined, as it always has. Example: accuracy None, fmt 1 -> NaN; with verify.weight=0 -> 1 * w_fmt."""
    stacked = torch.stack([per_func[k] for k in weights], 1)
    w = torch.tensor(list(weights.values()), dtype=stacked.dtype)
    out = (stacked * w).nansum(1)
    active = [k for k, wk in weights.items() if wk != 0] or [verifier]
    undefined = torch.stack([per_func[k] for k in active], 1).isnan().all(1)
    if weights[verifier] != 0:
        undefined |= per_func[verifier].isnan()
    return out.masked_fill(undefined, math.nan)
