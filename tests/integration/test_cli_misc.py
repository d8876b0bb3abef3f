"""The CLI's other commands, and bad input: one paragraph, exit status 2, never a traceback."""

import shlex

import pytest

from .conftest import cli, run_main


def test_list_shows_every_registry_and_group():
    out = cli("list").stdout
    for word in (
        "rollout",
        "verify",
        "segment",
        "redistribute",
        "update",
        "dapo",
        "uniform",
        "fixed",
        "gsm8k",
        "exp",
        "debug",
    ):
        assert word in out


def test_config_show_prints_the_composed_config():
    out = cli("config", "show", "rollout.temperature=0.7", "+exp=gsm8k").stdout
    assert "temperature: 0.7" in out and "openai/gsm8k" in out


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "rollout.temprature=0.8"], ["rollout.temperature"]),
        (["train", "rollout.temperature=hot"], ["wrong type"]),
        (["train", "algo=ppo"], ["grpo"]),
        (["train", "train.new_key=1"], ["+train.new_key"]),
        (["train", "rollout.group_size=1"], ["at least 2"]),
        (["train", "train.generation_batch_size=30"], ["whole number of groups"]),
        (["train", "segment.name=sentence"], ["fixed, hybrid"]),
        (
            ["train", "task=gsm8k", "task.path=/nonexistent/data.jsonl", "warmstart.enabled=false"],
            ["no such file", "task.path"],
        ),
        (["eval"], ["checkpoint=PATH"]),
        (["eval", "checkpoint=/nonexistent/run"], ["neither a model directory"]),
        (["train", "resume=true", "run_dir=/nonexistent/run"], ["holds no run"]),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args, words, tmp_path):
    """Through the real entry point, in this process (test_bad_input.py starts real processes for a few)."""
    code, err = run_main(shlex.join(args))
    assert code == 2, err
    assert "Traceback" not in err
    for w in words:
        assert w in " ".join(err.split()), err


def test_unknown_command_is_a_usage_error():
    proc = cli("trian", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
