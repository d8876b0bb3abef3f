"""Datasets as TRL users have them (task=trl): a `prompt` column of chat messages or text, the gold in
`solution` (open-r1) or `answer`, the other columns kept for the reward functions; local jsonl and parquet
files (a hub name is the same datasets.load_dataset call with a name instead of a file)."""

import json

import pytest

from rredcot.compose import load_config
from rredcot.errors import UserError
from rredcot.task.hub import gold_from, hf_task, load_rows
from rredcot.task.model import load_tokenizer

CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
CHAT += "{% if add_generation_prompt %}<|assistant|>{% endif %}"


def _rows(n=12, gold="solution"):
    return [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i}+1?"}],
            gold: f"The sum is $\\boxed{{{i + 1}}}$." if gold == "solution" else str(i + 1),
            "level": i % 3,
        }
        for i in range(n)
    ]


def _write(path, rows):
    if path.suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    load_rows.cache_clear()
    return path


def _task(path, *extra):
    return load_config(["task=trl", f"task.path={path}", "eval.split=dev", "task.dev_size=2", *extra]).task


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


@pytest.fixture(scope="module")
def chat_tok():
    t = load_tokenizer("builtin")
    t.chat_template = CHAT
    return t


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_conversational_dataset_goes_through_the_chat_template(tmp_path, chat_tok, suffix):
    path = _write(tmp_path / f"train{suffix}", _rows())
    train, dev = (hf_task(_task(path), split, chat_tok) for split in ("train", "dev"))
    assert len(train) + len(dev) == 12 and len(dev) == 2
    i = int(train[0].meta["row"])
    assert train[0].prompt == f"<|system|>Be brief.\n<|user|>What is {i}+1?\n<|assistant|>"
    assert train[0].gold == str(i + 1)  # the open-r1 solution's \boxed{} (answer_format: auto)
    assert train[0].meta["prompt"][1] == {"role": "user", "content": f"What is {i}+1?"}  # as reward functions get it
    assert train[0].meta["columns"] == {"solution": f"The sum is $\\boxed{{{i + 1}}}$.", "level": i % 3}


def test_without_a_chat_template_a_conversation_is_its_text(tmp_path, tok):
    train = hf_task(_task(_write(tmp_path / "t.jsonl", _rows())), "train", tok)
    assert any(s.prompt == "Be brief.\nWhat is 3+1?\n" for s in train)


def test_plain_text_prompts_and_an_answer_column(tmp_path, tok):
    rows = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(12)]
    train = hf_task(_task(_write(tmp_path / "t.jsonl", rows)), "train", tok)
    assert {s.gold for s in train} <= {str(i + 1) for i in range(12)}  # `answer` when there is no `solution`
    assert all(s.prompt.startswith("What is") and s.meta["prompt"] == s.prompt.strip() for s in train)


def test_no_gold_column_names_the_fields(tmp_path, tok):
    rows = [{"prompt": f"What is {i}+1?", "target": str(i + 1)} for i in range(12)]
    with pytest.raises(UserError, match=r"no field\(s\) \['solution'\].*task.answer_field"):
        hf_task(_task(_write(tmp_path / "t.jsonl", rows)), "train", tok)


def test_malformed_messages_are_refused_as_not_text(tmp_path, tok):
    rows = [{"prompt": [{"role": "user"}], "solution": "1"} for _ in range(12)]  # a message without content
    with pytest.raises(UserError, match="list of chat messages"):
        hf_task(_task(_write(tmp_path / "t.jsonl", rows)), "train", tok)


def test_a_task_without_a_path_says_which_key_to_set(tok):
    with pytest.raises(UserError, match=r"task.path is not set"):
        hf_task(load_config(["task=trl", "eval.split=dev"]).task, "train", tok)


def test_a_trl_test_split_is_not_the_training_file(tmp_path, tok):
    with pytest.raises(UserError, match=r"task.sources.test is not set"):
        hf_task(_task(_write(tmp_path / "t.jsonl", _rows())), "test", tok)


@pytest.mark.parametrize(
    "answer, gold",
    [("so $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"), ("42", "42"), ("  x = 3 ", "x = 3")],
)
def test_auto_gold(answer, gold):
    assert gold_from(answer, "auto") == gold
