"""Hard time limits on verification (stages/guard.py): a stuck verifier call can never hang a run."""

from __future__ import annotations

import time

from rredcot.stages.guard import OVER_BUDGET, TIMEOUT, Guarded, run_guarded
from rredcot.stages.verify import BuiltinVerifier, RewardFuncs, run_verify
from rredcot.types import Sample, Score

SAMPLE = Sample(prompt="a=1. a=?\n", gold="14")


class Stuck(BuiltinVerifier):
    """Hangs (like a symbolic checker on a 200-deep fraction) on completions containing 'hang'."""

    def extract(self, completion):
        if "hang" in completion:
            time.sleep(3600)
        return super().extract(completion)

    def judge(self, answer, sample):
        if answer == "hang":
            time.sleep(3600)
        return super().judge(answer, sample)


class Broken(BuiltinVerifier):
    def extract(self, completion):
        raise KeyError("a bug in a plug-in verifier")


def test_a_stuck_call_scores_zero_within_the_timeout_and_the_next_call_works():
    v = Guarded(Stuck(), timeout_s=0.5)
    t = time.monotonic()
    assert v("<think>\nhang\n</think>\n14", SAMPLE) == Score(0.0, TIMEOUT)
    assert v.extract("hang") == (None, TIMEOUT)
    assert v.judge("hang", SAMPLE) == 0.0
    assert time.monotonic() - t < 5  # three timeouts of 0.5 s, plus starting workers
    assert v("<think>\nb=1+13=14\n</think>\n14", SAMPLE) == Score(1.0, "after_think")  # a fresh worker
    assert v.judge("14", SAMPLE) == 1.0 and v.extract("<think>\n</think>\n13") == ("13", "after_think")


def test_a_verifier_bug_is_raised_with_its_traceback_not_hidden_as_a_zero():
    v = Guarded(Broken(), timeout_s=5)
    try:
        v("x", SAMPLE)
    except RuntimeError as e:
        assert "a bug in a plug-in verifier" in str(e) and "KeyError" in str(e)
    else:
        raise AssertionError("the verifier's exception was swallowed")


def test_the_step_budget_leaves_the_rest_unchecked_and_counted():
    calls = []

    def slow(text, sample):
        calls.append(text)
        time.sleep(0.2)
        return Score(1.0, "after_think")

    # budget 0.3 s: calls at t=0, 0.2 and 0.4 > 0.3 -> the third and fourth are never run
    out = run_guarded(slow, ["a", "b", "c", "d"], [SAMPLE] * 4, budget_s=0.3)
    assert [s.extractor for s in out] == ["after_think", "after_think", OVER_BUDGET, OVER_BUDGET]
    assert [s.reward for s in out] == [1.0, 1.0, 0.0, 0.0] and calls == ["a", "b"]


def test_run_verify_counts_timeouts_as_reward_zero():
    v = Guarded(Stuck(), timeout_s=0.5)
    ver = run_verify(["<think>\nhang\n</think>\n14", "<think>\n</think>\n14"], [SAMPLE] * 2, RewardFuncs(v))
    assert ver.rewards.tolist() == [0.0, 1.0] and ver.extractor == [TIMEOUT, "after_think"]


def test_a_pathological_math_answer_is_cut_off_by_the_hard_timeout():
    from rredcot.stages.verify import build_verifier

    v = Guarded(build_verifier("math"), timeout_s=1)
    deep = "\\boxed{" + "\\sqrt{\\frac{1}{" * 300 + "2" + "}}" * 300 + "}"
    t = time.monotonic()
    score = v(deep, Sample(prompt="p", gold="\\frac{1}{2}"))
    assert time.monotonic() - t < 4 and score.reward in (0.0, 1.0)
