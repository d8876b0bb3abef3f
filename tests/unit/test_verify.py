"""Verifiers as plain functions, checked with tables of strings."""
import threading

import pytest

from rredcot.stages.verify import normalize_number, run_verify, verify_builtin, verify_format, verify_gsm8k, verify_math
from rredcot.task.datasets import gold_from
from rredcot.types import Sample

S7 = Sample(prompt="a=3, b=a+4. b=?\n", gold="7")


@pytest.mark.parametrize("completion, reward, extractor", [
    ("<think>\nb=3+4=7\n</think>\n7", 1.0, "after_think"),
    ("<think>\nb=3+4=8\n</think>\n8", 0.0, "after_think"),
    ("<think>\nb=3+4=7\n</think>\n 7 apples", 1.0, "after_think"),
    ("<think>\nb=3+4=7\n", 0.0, "none"),              # no end-of-thinking marker: no answer
    ("<think>\nb=7\n</think>\n", 0.0, "none"),          # marker but nothing after it
    ("7</think>8</think>7", 1.0, "after_think"),        # the last marker counts
])
def test_builtin(completion, reward, extractor):
    assert tuple(verify_builtin(completion, S7)) == (reward, extractor)


@pytest.mark.parametrize("text, value", [("1,234.50", 1234.5), ("$18.", 18.0), ("-3", -3.0), ("abc", None)])
def test_normalize_number(text, value):
    assert normalize_number(text) == value


G18 = Sample(prompt="q", gold="18")


@pytest.mark.parametrize("completion, mode, reward, extractor", [
    ("so 9 * 2 = 18\n#### 18", "strict", 1.0, "strict"),
    ("#### 17 wait\n#### 18", "strict", 1.0, "strict"),     # the last '####' wins
    ("#### $18.00", "strict", 1.0, "strict"),
    ("the answer is 18", "strict", 0.0, "none"),             # strict needs '####'
    ("the answer is 18", "flexible", 1.0, "flexible"),       # flexible: the last number
    ("18 eggs, minus 2 = 16", "flexible", 0.0, "flexible"),
    ("no numbers here", "flexible", 0.0, "none"),
    ("#### 1,8", "strict", 1.0, "strict"),                    # commas are removed like the gold's
])
def test_gsm8k(completion, mode, reward, extractor):
    assert tuple(verify_gsm8k(completion, G18, mode=mode)) == (reward, extractor)


def test_gsm8k_bad_mode():
    with pytest.raises(ValueError, match="strict' or 'flexible"):
        verify_gsm8k("#### 1", G18, mode="loose")


@pytest.mark.parametrize("answer, fmt, gold", [
    ("She has 3 + 4 = 7.\n#### 1,234", "gsm8k", "1234"),
    ("so $\\boxed{\\frac{1}{2}}$.", "boxed", "\\frac{1}{2}"),
    ("\\boxed{a} then \\boxed{\\{1, 2\\}}", "boxed", "\\{1, 2\\}"),
    ("no box", "boxed", ""),
    (" 42 ", "plain", "42"),
])
def test_gold_from(answer, fmt, gold):
    assert gold_from(answer, fmt) == gold


@pytest.mark.parametrize("completion, gold, reward", [
    ("The answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("The answer is \\boxed{0.5}", "\\frac{1}{2}", 1.0),     # equivalent forms verify
    ("The answer is \\boxed{3}", "\\frac{1}{2}", 0.0),
    ("I give up", "2", 0.0),
])
def test_math(completion, gold, reward):
    assert verify_math(completion, Sample("q", gold)).reward == reward


def test_math_unparseable_gold_is_undefined_not_one():
    score = verify_math("\\boxed{}", Sample("q", ""))
    assert score.reward is None and score.extractor == "unparseable_gold"


def test_math_off_the_main_thread():
    # math-verify's SIGALRM timeouts fail off the main thread; ours turns them off there instead.
    out = []
    t = threading.Thread(target=lambda: out.append(verify_math("\\boxed{1/2}", Sample("q", "\\frac{1}{2}")).reward))
    t.start()
    t.join()
    assert out == [1.0]


@pytest.mark.parametrize("completion, reward", [
    ("<think>\nstep\n</think>\n7", 1.0), ("<think>\nstep\n</think>\n", 0.0), ("7", 0.0), ("</think>7", 0.0),
])
def test_format(completion, reward):
    assert verify_format(completion, S7).reward == reward


def test_run_verify_weights_and_undefined_rows():
    funcs = {"accuracy": (verify_math, 1.0), "format": (verify_format, 0.5)}
    samples = [Sample("q", "2"), Sample("q", "")]
    v = run_verify(["<think>\nx\n</think>\n\\boxed{2}", "\\boxed{2}"], samples, funcs)
    assert v.rewards[0].item() == 1.5            # 1 * 1 + .5 * 1
    assert v.rewards[1].isnan()                   # undefined gold: the row is skipped, never rewarded
    assert v.correct.tolist() == [True, False]
    assert v.extractor == ["math_verify", "unparseable_gold"]
