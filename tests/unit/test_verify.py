"""Verifiers, checked with tables of strings; every registered verifier keeps its extract/judge contract."""

import threading

import pytest

from rredcot.errors import UserError
from rredcot.registry import names
from rredcot.stages.verify import (
    BuiltinVerifier,
    FormatVerifier,
    GSM8KVerifier,
    MathVerifier,
    RewardFuncs,
    build_verifier,
    normalize_number,
    run_verify,
)
from rredcot.task.hub import gold_from
from rredcot.types import Sample

S7 = Sample(prompt="a=3, b=a+4. b=?\n", gold="7")
verify_builtin, verify_format, verify_math = BuiltinVerifier(), FormatVerifier(), MathVerifier()


def verify_gsm8k(completion, sample, mode="flexible"):
    return GSM8KVerifier(mode)(completion, sample)


@pytest.mark.parametrize(
    "completion, reward, extractor",
    [
        ("<think>\nb=3+4=7\n</think>\n7", 1.0, "after_think"),
        ("<think>\nb=3+4=8\n</think>\n8", 0.0, "after_think"),
        ("<think>\nb=3+4=7\n</think>\n 7 apples", 1.0, "after_think"),
        ("<think>\nb=3+4=7\n", 0.0, "none"),  # no end-of-thinking marker: no answer
        ("<think>\nb=7\n</think>\n", 0.0, "none"),  # marker but nothing after it
        ("7</think>8</think>7", 1.0, "after_think"),  # the last marker counts
    ],
)
def test_builtin(completion, reward, extractor):
    assert tuple(verify_builtin(completion, S7)) == (reward, extractor)


@pytest.mark.parametrize("text, value", [("1,234.50", 1234.5), ("$18.", 18.0), ("-3", -3.0), ("abc", None)])
def test_normalize_number(text, value):
    assert normalize_number(text) == value


G18 = Sample(prompt="q", gold="18")


@pytest.mark.parametrize(
    "completion, mode, reward, extractor",
    [
        ("so 9 * 2 = 18\n#### 18", "strict", 1.0, "strict"),
        ("#### 17 wait\n#### 18", "strict", 1.0, "strict"),  # the last '####' wins
        ("#### $18.00", "strict", 1.0, "strict"),
        ("the answer is 18", "strict", 0.0, "none"),  # strict needs '####'
        ("the answer is 18", "flexible", 1.0, "flexible"),  # flexible: the last number
        ("18 eggs, minus 2 = 16", "flexible", 0.0, "flexible"),
        ("no numbers here", "flexible", 0.0, "none"),
        ("#### 1,8", "strict", 1.0, "strict"),  # commas are removed like the gold's
    ],
)
def test_gsm8k(completion, mode, reward, extractor):
    assert tuple(verify_gsm8k(completion, G18, mode=mode)) == (reward, extractor)


def test_gsm8k_bad_mode():
    with pytest.raises(UserError, match="strict' or 'flexible"):
        verify_gsm8k("#### 1", G18, mode="loose")


@pytest.mark.parametrize(
    "answer, fmt, gold",
    [
        ("She has 3 + 4 = 7.\n#### 1,234", "gsm8k", "1234"),
        ("so $\\boxed{\\frac{1}{2}}$.", "boxed", "\\frac{1}{2}"),
        ("\\boxed{a} then \\boxed{\\{1, 2\\}}", "boxed", "\\{1, 2\\}"),
        ("no box", "boxed", ""),
        (" 42 ", "plain", "42"),
    ],
)
def test_gold_from(answer, fmt, gold):
    assert gold_from(answer, fmt) == gold


@pytest.mark.parametrize(
    "completion, gold, reward",
    [
        ("The answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("The answer is \\boxed{0.5}", "\\frac{1}{2}", 1.0),  # equivalent forms verify
        ("The answer is \\boxed{3}", "\\frac{1}{2}", 0.0),
        ("I give up", "2", 0.0),
    ],
)
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


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("<think>\nstep\n</think>\n7", 1.0),
        ("<think>\nstep\n</think>\n", 0.0),
        ("7", 0.0),
        ("</think>7", 0.0),
    ],
)
def test_format(completion, reward):
    assert verify_format(completion, S7).reward == reward


def test_run_verify_weights_and_undefined_rows():
    funcs = RewardFuncs(verify_math, 1.0, {"format": (verify_format, 0.5)})
    samples = [Sample("q", "2"), Sample("q", "")]
    v = run_verify(["<think>\nx\n</think>\n\\boxed{2}", "\\boxed{2}"], samples, funcs)
    assert v.rewards[0].item() == 1.5  # 1 * 1 + .5 * 1
    assert v.rewards[1].isnan()  # undefined gold: the row is skipped, never rewarded
    assert v.correct.tolist() == [True, False]
    assert v.extractor == ["math_verify", "unparseable_gold"]


# Every verifier: whole-completion reward == judge(extract(completion)), and judge is what answer forcing
# uses for U(a). A plug-in verifier that breaks this would make RREDCoT's values disagree with its rewards.
CONTRACT = [
    ("builtin", {}, "<think>\nb=7\n</think>\n7", "7", 1.0),
    ("builtin", {}, "<think>\nb=8\n</think>\n8", "7", 0.0),
    ("gsm8k", {"mode": "strict"}, "so #### 18", "18", 1.0),
    ("gsm8k", {"mode": "strict"}, "so 18", "18", 0.0),
    ("gsm8k", {"mode": "flexible"}, "so 18", "18", 1.0),
    ("math", {}, "so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("math", {}, "so \\boxed{3}", "\\frac{1}{2}", 0.0),
]


@pytest.mark.parametrize("name, options, completion, gold, reward", CONTRACT)
def test_reward_equals_judge_of_extract(name, options, completion, gold, reward):
    v, s = build_verifier(name, options), Sample("q", gold)
    answer, _ = v.extract(completion)
    assert v(completion, s).reward == v.judge(answer, s) == reward


def test_every_registered_verifier_is_in_the_contract_table():
    assert set(names("verify")) - {"format"} <= {row[0] for row in CONTRACT}


@pytest.mark.parametrize(
    "name, answer, gold", [("builtin", "14", "14"), ("gsm8k", "1,234", "1234"), ("math", "0.5", "\\frac{1}{2}")]
)
def test_judge_scores_a_bare_answer(name, answer, gold):
    # answer forcing scores bare candidate answers: no marker, no '####', no box around them
    assert build_verifier(name).judge(answer, Sample("q", gold)) == 1.0


def test_unknown_verifier_option_is_a_user_error():
    with pytest.raises(UserError, match="do not fit"):
        build_verifier("builtin", {"mode": "strict"})


def test_gsm8k_regex_is_linear_on_runs_of_commas():
    import time

    t = time.perf_counter()
    GSM8KVerifier("flexible")("#### " + "," * 20000 + " 7", G18)
    assert time.perf_counter() - t < 1.0


def test_check_golds_refuses_a_gold_format_the_verifier_cannot_read():
    from rredcot.errors import UserError
    from rredcot.stages.verify import check_golds

    v = build_verifier("gsm8k", {"mode": "strict"})
    good = [Sample(prompt=f"q{i}", gold=str(i), meta={"row": i}) for i in range(100)]
    check_golds({"train": good}, v, max_bad=0.01)  # every gold judges itself right
    # answer_format=plain keeps the whole solution as the gold: "3 + 4 = 7 #### 7" is not a number
    bad = good[:98] + [Sample(prompt="x", gold="3 + 4 = 7 #### 7", meta={"row": 98})] * 2
    with pytest.raises(UserError, match=r"2 of the first 100 rows \(rows \[98, 98\]"):
        check_golds({"train": bad}, v, max_bad=0.01)  # 2 > 1% of 100
    check_golds({"train": good[:99] + bad[-1:]}, v, max_bad=0.01)  # 1 of 100 is a stray row: a note, not a refusal
