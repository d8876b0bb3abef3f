"""The built-in task: deterministic, disjoint splits, correct traces, flaws where asked."""

import re

from rredcot.task.arith import ArithSpec, Flaws, extract_answer, generate, misconception, split_of


def _check_trace(trace: str) -> bool:
    """Every line 'v=x op k=y' computes y correctly."""
    for x, op, k, y in re.findall(r"=(-?\d+)([+\-*])(\d+)=(-?\d+)", trace):
        x, k, y = int(x), int(k), int(y)
        if y != (x + k if op == "+" else x - k if op == "-" else x * k):
            return False
    return True


def test_same_seed_same_problems_and_splits_are_disjoint():
    spec = ArithSpec(steps=3)
    a = generate(spec, "train", 300, seed=1)
    assert [s.prompt for s in a] == [s.prompt for s in generate(spec, "train", 300, seed=1)]
    test = generate(spec, "test", 100, seed=1)
    assert not {s.prompt for s in a} & {s.prompt for s in test}
    assert all(split_of(s.prompt) == "test" for s in test)


def test_traces_are_correct_and_end_with_the_gold():
    for s in generate(ArithSpec(steps=5, distractors=2, shuffle=True), "train", 200, seed=0):
        assert _check_trace(s.meta["trace"]) and extract_answer(s.meta["trace"])[0] == s.gold
        assert s.meta["trace"].count("\n") == 5 + 2  # <think>, 5 steps, </think>
        assert s.prompt.count("=") == 1 + 5 + 2 * 2 + 1  # start, steps, distractor pairs, query


def test_values_stay_in_range():
    for s in generate(ArithSpec(steps=6, max_value=15), "train", 200, seed=0):
        assert all(0 <= int(v) <= 15 for v in re.findall(r"=(\d+)\n", s.meta["trace"]))


def test_flaws_make_wrong_traces_at_about_the_asked_rate():
    samples = generate(ArithSpec(steps=4), "train", 2000, seed=0, flaws=Flaws(rate=0.3))
    frac = sum(s.meta["flawed"] for s in samples) / len(samples)
    assert 0.25 < frac < 0.35  # one wrong step in 30% of traces (an offset never cancels out)


def test_misconceptions_are_systematic():
    # A confusable fact always gets the same wrong offset; most facts are not confusable at 15%.
    facts = [(x, op, k) for x in range(21) for op in "+-*" for k in range(1, 10)]
    offsets = [misconception(*f, frac=0.15) for f in facts]
    share = sum(o is not None for o in offsets) / len(facts)
    assert 0.08 < share < 0.22
    assert all(misconception(*f, frac=0.15) == o for f, o in zip(facts, offsets))
