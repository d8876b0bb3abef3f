"""Start-up notes: a default that does not apply is said in one line, never silently."""

from rredcot.compose import load_config
from rredcot.startup import startup_notes
from rredcot.task.model import load_tokenizer


class SplitsThink:
    """A tokenizer without a `</think>` token (as most instruct models): the marker is 4 tokens."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1, 2, 3, 4] if text == "</think>" else [5]}


def test_a_tokenizer_without_the_think_token_is_said(capsys):
    startup_notes(load_config([]), SplitsThink())
    err = " ".join(capsys.readouterr().err.split())
    assert "no </think> token (it is 4 tokens here)" in err


def test_a_verifier_other_than_the_tasks_is_said(capsys):
    startup_notes(load_config(["verify.name=gsm8k"]), load_tokenizer("builtin"))
    err = " ".join(capsys.readouterr().err.split())
    assert "verify.name=gsm8k scores this run, not the task's own verifier (builtin)" in err


def test_the_default_run_says_nothing(capsys):
    startup_notes(load_config([]), load_tokenizer("builtin"))
    assert capsys.readouterr().err == ""


def test_a_carved_dev_split_is_said(capsys):
    startup_notes(load_config(["task=gsm8k", "eval.split=dev"]), load_tokenizer("builtin"))
    assert "carved out of the training rows" in " ".join(capsys.readouterr().err.split())


def test_a_missing_chat_template_is_said(capsys):
    startup_notes(load_config(["task=gsm8k"]), load_tokenizer("builtin"))
    assert "no chat template" in capsys.readouterr().err


def test_trls_loss_warnings_and_dynamic_sampling_over_credit_are_said():
    from rredcot.startup import loss_notes

    said = lambda *o: " ".join(loss_notes(load_config(list(o))))  # noqa: E731
    assert "meant for update.importance_sampling_level=sequence" in said("update.loss_type=luspo")
    assert "importance_sampling_level=token fits it" in said(
        "update.loss_type=vespo", "update.importance_sampling_level=sequence"
    )
    assert "GSPO's own setup is update.loss_type=grpo" in said("update.importance_sampling_level=sequence")
    assert said("update.loss_type=grpo", "update.importance_sampling_level=sequence") == ""
    assert "(equal_groups=keep) gives their traces credit" in said("train.dynamic_sampling=true")  # RREDCoT
    assert said("train.dynamic_sampling=true", "algo=grpo") == ""  # GRPO: an all-equal group has advantage 0
    assert said("train.dynamic_sampling=true", "redistribute.equal_groups=zero") == ""
