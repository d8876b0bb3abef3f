"""Pure pieces of the start-up checks: values shown short, the prompt limit that works, the built-in model's
shape, a task's return value. Each suggested fix is applied and passes the same check."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from rredcot.errors import UserError, brief
from rredcot.startup import PromptLimit, long_prompt_advice, prompt_limit
from rredcot.task.model import check_shape
from rredcot.task.rows import check_samples
from rredcot.task.splits import needed_limit
from rredcot.types import Sample


@pytest.mark.parametrize(
    "value, shown",
    [(10**30, "1e+30"), (-(10**20), "-1e+20"), (12, "12"), (0.5, "0.5"), ("ab", "'ab'"), ([1, 2], "[1, 2]")],
)
def test_brief(value, shown):
    assert brief(value) == shown


def test_brief_cuts_long_text_in_the_middle():
    assert brief("x" * 1000) == "'" + "x" * 16 + "..." + "x" * 16 + "' (1000 characters)"


def test_needed_limit():
    assert needed_limit({0: 10, 1: 20, 2: 30, 3: 40}, 4, 0.25) == 30  # one of four may be skipped
    assert needed_limit({0: 10, 1: 20}, 4, 0.0) is None  # two prompts were never measured (too long for any)


def _cfg(new=40, cap=512):
    return OmegaConf.create({"rollout": {"max_new_tokens": new}, "train": {"max_prompt_tokens": cap}})


class _Model:
    def __init__(self, context):
        self.config = type("C", (), {"max_position_embeddings": context})()


def _limit_after(advice: str, cfg, context: int) -> int:
    """The prompt limit once the `key=value` settings the advice names are applied."""
    for key, value in re.findall(r"((?:rollout|train)\.\w+)=(\d+)", advice):
        OmegaConf.update(cfg, key, int(value))
    return prompt_limit(cfg, _Model(context))


@pytest.mark.parametrize(
    "new, cap, context, needed, knob",
    [
        (40, 512, 128, 95, "rollout.max_new_tokens=33"),  # the context binds: fewer new tokens, not a larger cap
        (40, 64, 4096, 95, "train.max_prompt_tokens=95"),  # the cap binds
        (100, 64, 160, 95, "train.max_prompt_tokens=95 rollout.max_new_tokens=65"),  # both
    ],
)
def test_long_prompt_advice_names_the_knob_that_binds_with_a_value_that_works(new, cap, context, needed, knob):
    cfg = _cfg(new, cap)
    assert prompt_limit(cfg, _Model(context)) < needed
    advice = long_prompt_advice(cfg, context)(needed)
    assert knob in advice and _limit_after(advice, cfg, context) >= needed
    assert "raise train.max_prompt_tokens" not in advice.lower() or "train.max_prompt_tokens" in knob


def test_prompts_longer_than_the_whole_context_say_so():
    assert "the model's whole context is 64 positions" in long_prompt_advice(_cfg(), 64)(95)


def test_the_prompt_limit_remembers_the_context():
    limit = prompt_limit(_cfg(), _Model(128))
    assert limit == 88 and isinstance(limit, PromptLimit) and limit.context == 128


@pytest.mark.parametrize("hidden, heads", [(128, 3), (12, 4), (7, 7), (130, 4), (96, 5)])
def test_a_model_shape_that_does_not_divide_is_refused_with_shapes_that_build(hidden, heads):
    import torch

    from rredcot.task.model import build_tiny

    shape = {"arch": "llama", "hidden_size": hidden, "intermediate_size": 32, "layers": 1, "heads": heads}
    with pytest.raises(UserError) as e:
        check_shape(OmegaConf.create(shape))
    fixes = re.findall(r"model\.(heads|hidden_size)=(\d+)", str(e.value).split("Set ")[-1])
    assert fixes, str(e.value)
    for key, value in fixes:
        cfg = OmegaConf.create({**shape, key: int(value), "max_positions": 16})
        model = build_tiny(cfg, vocab_size=8, seed=0)  # the check passes, and rotary embeddings run
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 8)


@pytest.mark.parametrize(
    "returned, said",
    [
        (None, "a NoneType for the train split, not a list of Samples"),
        ([{"prompt": "q", "gold": "1"}], "a dict as row 0 of its train split"),
        ([Sample("q", 82)], "a Sample whose gold is a int (82)"),
        ([Sample(["q"], "1")], "a Sample whose prompt is a list"),
    ],
)
def test_a_tasks_return_value_is_checked(returned, said):
    with pytest.raises(UserError) as e:
        check_samples("plug", "train", returned)
    assert said in str(e.value) and "str(82), not 82" in str(e.value)
    assert check_samples("plug", "train", [Sample("q", "1")]) == [Sample("q", "1")]
