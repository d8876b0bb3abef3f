"""The built-in search task: the listed candidates checked in order with a verdict each, stopping at the
first "yes", so the answer is known part-way; disjoint splits; misconceived checks ruin a trace; it
warm-starts within the built-in model's budget."""

import re

import pytest

from rredcot.task.arith import Flaws, extract_answer, split_of
from rredcot.task.search import Problem, SearchSpec, generate, trace_text

LINE = re.compile(r"^(\d+)\*(\d+)\+(\d+)=(-?\d+) (yes|no)$")


def test_a_worked_search_checks_the_listed_candidates_in_order_and_stops_at_yes():
    # x*3+4=19 over 2,7,5,8: 2 -> 10 no, 7 -> 25 no, 5 -> 19 yes; 8 is never checked
    p = Problem(x=5, a=3, b=4, order=(2, 7, 5, 8))
    assert p.prompt == "x*3+4=19. x in 2,7,5,8? x=?\n"
    assert trace_text(p) == "<think>\n2*3+4=10 no\n7*3+4=25 no\n5*3+4=19 yes\nso x=5\n</think>\n5"


def test_clean_traces_are_right_and_the_answer_turns_up_part_way():
    samples = generate(SearchSpec(), "train", 500, seed=0)
    for s in samples:
        lines = [LINE.match(line).groups() for line in s.meta["trace"].split("\n")[1:-3]]
        assert all(int(c) * int(a) + int(b) == int(y) for c, a, b, y, _ in lines)  # every check computed right
        assert [v for *_, v in lines] == ["no"] * (len(lines) - 1) + ["yes"]
        assert lines[-1][0] == s.gold == extract_answer(s.meta["trace"])[0]
    at = [s.meta["answer_at"] for s in samples]
    assert {0, 1, 2, 3, 4} == set(at) and 1.5 < sum(at) / len(at) < 2.5  # anywhere in the list, 2 on average


def test_splits_are_disjoint_and_deterministic():
    train = generate(SearchSpec(), "train", 500, seed=3)
    assert [s.prompt for s in train] == [s.prompt for s in generate(SearchSpec(), "train", 500, seed=3)]
    test = generate(SearchSpec(), "test", 200, seed=3)
    assert not {s.prompt for s in train} & {s.prompt for s in test} and all(split_of(s.prompt) == "test" for s in test)


def test_a_misconceived_check_says_yes_to_a_wrong_candidate_and_the_trace_answers_it():
    flawed = [s for s in generate(SearchSpec(), "train", 2000, seed=0, flaws=Flaws(0.0, 0.5, 1.0)) if s.meta["flawed"]]
    assert len(flawed) > 200
    for s in flawed[:50]:
        c, _, _, y, verdict = LINE.match(s.meta["trace"].split("\n")[-4]).groups()
        target = int(s.prompt.split("=")[1].split(".")[0])
        assert (int(y), verdict) == (target, "yes") and c != s.gold
        assert extract_answer(s.meta["trace"])[0] == c


def test_impossible_sizes_are_refused():
    with pytest.raises(ValueError, match="distinct problems"):
        generate(SearchSpec(max_x=2, max_a=2, max_b=0, candidates=2), "train", 100, seed=0)


def test_search_warm_start_traces_fit_the_built_in_model():
    from rredcot.compose import load_config
    from rredcot.task.model import load_tokenizer
    from rredcot.task.warmstart import warmstart_samples

    cfg = load_config(["+exp=search", "warmstart.examples=2000"])
    samples = warmstart_samples(cfg, load_tokenizer("builtin"))
    assert len(samples) == 2000 and cfg.rollout.max_new_tokens >= max(len(s.meta["trace"]) for s in samples) + 1
