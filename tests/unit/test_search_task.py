"""The built-in search task: one candidate per line until one meets the target, the answer known
part-way; disjoint splits; flawed checks ruin a trace; it warm-starts and composes."""
import re

import pytest

from rredcot.task.arith import Flaws, extract_answer, split_of
from rredcot.task.search import Problem, SearchSpec, generate, trace_text

LINE = re.compile(r"^(\d+)\*(\d+)\+(\d+)=(-?\d+)$")


def test_a_worked_search_tries_candidates_then_states_the_answer():
    # x*3+4=19: tries 2 (10) and 7 (25), then 5 meets the target; "so x=5"; the answer after </think>
    p = Problem(x=5, a=3, b=4, order=(2, 7, 5))
    assert p.prompt == "x*3+4=19. x=?\n"
    assert trace_text(p) == "<think>\n2*3+4=10\n7*3+4=25\n5*3+4=19\nso x=5\n</think>\n5"


def test_clean_traces_are_right_and_the_answer_turns_up_part_way():
    samples = generate(SearchSpec(), "train", 400, seed=0)
    early = 0
    for s in samples:
        lines = s.meta["trace"].split("\n")[1:-3]  # the candidate lines
        results = [LINE.match(line).groups() for line in lines]
        assert all(int(c) * int(a) + int(b) == int(y) for c, a, b, y in results)  # every check computed right
        assert results[-1][0] == s.gold and extract_answer(s.meta["trace"])[0] == s.gold
        early += len(lines) > 1
    assert 0.6 < early / len(samples) < 0.95  # most traces try wrong candidates before the answer


def test_splits_are_disjoint_and_deterministic():
    train = generate(SearchSpec(), "train", 500, seed=3)
    assert [s.prompt for s in train] == [s.prompt for s in generate(SearchSpec(), "train", 500, seed=3)]
    test = generate(SearchSpec(), "test", 200, seed=3)
    assert not {s.prompt for s in train} & {s.prompt for s in test} and all(split_of(s.prompt) == "test" for s in test)


def test_a_misconceived_check_ends_the_search_on_a_wrong_x():
    flawed = generate(SearchSpec(), "train", 2000, seed=0, flaws=Flaws(0.0, 0.5, 1.0))
    wrong = [s for s in flawed if s.meta["flawed"]]
    assert len(wrong) > 200
    for s in wrong[:50]:
        last = LINE.match(s.meta["trace"].split("\n")[-4]).groups()
        target = int(s.prompt.split("=")[1].split(".")[0])
        assert int(last[3]) == target and last[0] != s.gold  # a wrong x "met" the target ...
        assert extract_answer(s.meta["trace"])[0] == last[0]  # ... and is the answer given


def test_too_few_distinct_conditions_are_refused():
    with pytest.raises(ValueError, match="distinct problems"):
        generate(SearchSpec(max_x=2, max_a=2, max_b=1), "train", 100, seed=0)


def test_search_warm_start_traces_fit_the_built_in_model():
    from rredcot.config import load_config
    from rredcot.task.model import load_tokenizer
    from rredcot.task.warmstart import warmstart_samples

    cfg = load_config(["+exp=search", "warmstart.examples=2000"])
    samples = warmstart_samples(cfg, load_tokenizer("builtin"))
    assert len(samples) == 2000 and cfg.rollout.max_new_tokens >= max(len(s.meta["trace"]) for s in samples) + 1
