"""Hub-shaped tasks on local files: one source per split, a dev split carved out of training, overlaps
refused, bad rows counted. (The hub path is the same code with a dataset name instead of a file.)"""

import json

import pytest

from rredcot.compose import load_config
from rredcot.errors import UserError
from rredcot.startup import task_sets
from rredcot.task.hub import hf_task
from rredcot.task.model import load_tokenizer
from rredcot.task.splits import check_disjoint, question_hash
from rredcot.types import Sample

from ..conftest import ASSETS

GSM_TRAIN, GSM_TEST = ASSETS / "gsm8k_train.jsonl", ASSETS / "gsm8k_test.jsonl"


def _cfg(*extra):
    return load_config(
        [
            "task=gsm8k",
            "warmstart.enabled=false",
            f"task.sources.train.path={GSM_TRAIN}",
            f"task.sources.test.path={GSM_TEST}",
            "task.dev_size=4",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


def _keys(samples):
    return {question_hash(s.prompt) for s in samples}


def test_each_split_reads_its_own_source_and_dev_is_carved_out_of_training(tok):
    cfg = _cfg()
    train, dev, test = (hf_task(cfg.task, s, tok) for s in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (32 - 4, 4, 8)  # 32 training rows, 4 of them become dev
    assert not _keys(train) & _keys(dev) and not _keys(train) & _keys(test)
    assert all(s.gold.isdigit() for s in train + dev + test)  # '#### 1,234' -> '1234'


def test_dev_does_not_depend_on_row_order(tok, tmp_path):
    shuffled = tmp_path / "train.jsonl"
    shuffled.write_text("".join(reversed(GSM_TRAIN.read_text().splitlines(keepends=True))))
    a = hf_task(_cfg().task, "dev", tok)
    b = hf_task(_cfg(f"task.sources.train.path={shuffled}").task, "dev", tok)
    assert sorted(s.prompt for s in a) == sorted(s.prompt for s in b)


def test_one_file_for_train_and_test_is_refused(tok):
    # The old `task.path=FILE` evaluated on rows 0-7 of the training file without a word.
    cfg = _cfg(f"task.sources.test.path={GSM_TRAIN}")
    with pytest.raises(UserError) as e:
        task_sets(cfg, tok)
    assert "shares" in str(e.value) and "eval.split=dev" in str(e.value)


def test_one_file_is_honest_on_dev(tok):
    train, held = task_sets(_cfg(f"task.path={GSM_TRAIN}", "eval.split=dev"), tok)
    assert len(held["dev"]) == 4 and not _keys(train) & _keys(held["dev"])


def test_a_stray_duplicate_leaves_training_instead():
    train = [Sample(f"q{i}", "1") for i in range(300)]
    held = {"test": [Sample("q7", "1")] + [Sample(f"t{i}", "1") for i in range(199)]}
    kept = check_disjoint(train, held)
    assert len(kept) == 299 and "q7" not in {s.prompt for s in kept}


def test_math_trains_on_math_and_tests_on_math500(tok):
    cfg = load_config(
        [
            "task=math500",
            f"task.sources.train.path={ASSETS / 'math_train.jsonl'}",
            f"task.sources.test.path={ASSETS / 'math500_test.jsonl'}",
            "task.dev_size=4",
        ]
    )
    train, held = task_sets(cfg, tok)
    assert len(train) == 20 and len(held["test"]) == 4
    assert train[0].gold.isdigit()  # from the solution's last \boxed{}
    assert held["test"][0].gold == "\\frac{3}{4}"  # MATH-500's answer field
    assert cfg.verify.name == "math"


def test_rows_without_gold_are_counted_and_refused(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(line) for line in GSM_TRAIN.read_text().splitlines()]
    rows[3]["answer"] = "no final answer marker"
    rows[5]["question"] = None
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"2 of 32 rows .*rows \[3, 5\]"):
        hf_task(_cfg(f"task.sources.train.path={bad}").task, "train", tok)
    kept = hf_task(_cfg(f"task.sources.train.path={bad}", "task.max_bad_fraction=0.1").task, "train", tok)
    assert len(kept) == 32 - 2 - 4


def test_a_split_without_a_source_says_so(tok):
    with pytest.raises(UserError, match="task.sources.test"):
        hf_task(_cfg("task.sources.test.split=null", "task.sources.test.path=null").task, "test", tok)


def test_a_dev_split_that_would_eat_training_is_refused(tok):
    with pytest.raises(UserError, match="task.dev_size=200 would take 32 of the 32"):
        hf_task(_cfg("task.dev_size=200").task, "train", tok)
