"""The verifier contract (stages/contract.py): a plug-in's return values, exceptions and crashes, in this
process and in a guard worker (stages/guard.py), each a one-paragraph UserError or a counted zero."""

from __future__ import annotations

import math
import os

import pytest

from rredcot.errors import UserError
from rredcot.stages.contract import Checked, check_golds
from rredcot.stages.guard import CRASHED, Guarded
from rredcot.stages.verify import BuiltinVerifier, RewardFuncs, run_verify
from rredcot.types import Sample, Score

S = Sample(prompt="a=1. a=?\n", gold="14")


class Returns(BuiltinVerifier):
    """__call__ returns `out`, judge returns `judged`."""

    def __init__(self, out=None, judged=1.0):
        self.out, self.judged = out, judged

    def __call__(self, completion, sample):
        return self.out if self.out is not None else super().__call__(completion, sample)

    def judge(self, answer, sample):
        return self.judged


BAD = [
    (Returns(out="1.0"), "returned '1.0' (a str) from __call__"),
    (Returns(out=1.0), "returned 1.0 (a float) from __call__"),
    (Returns(out=Score("1", "x")), "returned '1' (a str) from __call__"),
    (Returns(judged=math.nan), "returned the reward nan from __call__"),
    (Returns(judged=math.inf), "returned the reward inf"),
    (Returns(judged=[1.0]), "returned [1.0] (a list)"),
]


@pytest.mark.parametrize("timeout", [0, 5], ids=["in_process", "worker"])
@pytest.mark.parametrize("verifier, said", BAD, ids=[b[1][:30] for b in BAD])
def test_a_broken_return_value_is_refused_naming_the_verifier(verifier, said, timeout):
    v = Checked(Guarded(verifier, timeout) if timeout else verifier, "plug")
    with pytest.raises(UserError) as e:
        v("<think>\n</think>\n14", S)
    assert "The verifier 'plug'" in str(e.value) and said in str(e.value) and "Score(reward" in str(e.value)


@pytest.mark.parametrize("value, reward", [(None, None), (True, 1.0), (0, 0.0), (0.25, 0.25)])
def test_none_bools_and_numbers_are_rewards(value, reward):
    import numpy as np

    assert Checked(Returns(judged=value), "plug")("x", S).reward == reward
    assert Checked(Returns(judged=np.float32(0.5)), "plug").judge("x", S) == 0.5


class Raises(BuiltinVerifier):
    def extract(self, completion):
        raise KeyError("no such rule")


@pytest.mark.parametrize("timeout", [0, 5], ids=["in_process", "worker"])
def test_an_exception_is_one_paragraph_with_the_frame_that_raised(timeout):
    v = Checked(Guarded(Raises(), timeout) if timeout else Raises(), "plug")
    with pytest.raises(UserError) as e:
        v("odd text", S)
    msg = str(e.value)
    assert "raised in __call__ on 'odd text': KeyError: 'no such rule'" in msg and "test_contract.py:" in msg
    assert "\n" not in msg and "Traceback" not in msg


class DiesOn(BuiltinVerifier):
    """Kills its own process on completions containing 'die' (a segfault, the OOM killer, a plug-in's os._exit)."""

    def __call__(self, completion, sample):
        if "die" in completion:
            os._exit(3)
        return super().__call__(completion, sample)


def test_one_crash_scores_zero_counted_and_the_next_call_works():
    v = Checked(Guarded(DiesOn(), 5), "plug")
    assert v("die", S) == Score(0.0, CRASHED)
    assert v("<think>\n</think>\n14", S) == Score(1.0, "after_think")  # a fresh worker
    ver = run_verify(["die", "<think>\n</think>\n14"], [S, S], RewardFuncs(v))
    assert ver.extractor == [CRASHED, "after_think"] and ver.rewards.tolist() == [0.0, 1.0]


def test_a_worker_that_dies_on_every_call_is_refused_with_its_exit_status():
    v = Checked(Guarded(DiesOn(), 5), "plug")
    with pytest.raises(UserError) as e:
        for _ in range(3):
            v("die", S)
    assert "ended its worker process on 3 calls in a row: it exited with status 3" in str(e.value)


def test_check_golds_tries_the_verifier_before_any_run_writes():
    rows = [Sample(prompt=f"q{i}", gold=str(i), meta={"row": i}) for i in range(20)]
    with pytest.raises(UserError, match="returned '1.0' \\(a str\\) from __call__ for ''"):
        check_golds({"train": rows}, Returns(out="1.0"), 0.01)

    class Undefined(Returns):
        judges_gold = False  # not held to its gold: only the start-up try sees that it never defines a reward

    with pytest.raises(UserError, match="scores every completion tried at start-up as undefined"):
        check_golds({"train": rows}, Undefined(judged=None), 0.01)
    with pytest.raises(UserError, match=r"e.g. gold '0' judged None"):
        check_golds({"train": rows}, Returns(judged=None), 0.01)  # judges its gold: held to it
    check_golds({"train": rows}, Undefined(judged=0.0), 0.01)  # defined rewards: fine


def test_rewards_past_float32_are_refused_not_turned_into_inf():
    v = Checked(Returns(judged=1e39), "plug")
    with pytest.raises(UserError, match="overflow float32"):
        run_verify(["x"], [S], RewardFuncs(v))
