"""TRL-style reward functions (verify.reward_funcs): what they are called with, how their rewards combine
(TRL's None rule, checked against TRL's own formula), their contract, loading, and the run-directory rule."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from rredcot.errors import UserError
from rredcot.runconfig import refuse_code_from
from rredcot.stages.reward_funcs import (
    RewardCallable,
    build_callables,
    load_reward_func,
    only_callables_note,
    try_callables,
)
from rredcot.stages.verify import BuiltinVerifier, RewardFuncs, run_verify, total
from rredcot.types import Sample

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2?"}]


def _samples(n=4, chat=True):
    return [
        Sample(
            prompt="rendered",
            gold="3",
            meta={"prompt": CHAT if chat else "1+2?", "columns": {"solution": "3", "level": i}},
        )
        for i in range(n)
    ]


def _funcs(*fns, weight=0.0, weights=None):
    weights = weights or [1.0] * len(fns)
    return RewardFuncs(
        BuiltinVerifier(),
        weight,
        callables={f.__name__: (RewardCallable(f, f.__name__, f"m:{f.__name__}"), w) for f, w in zip(fns, weights)},
    )


def trl_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TRL 1.16.0 trl/trainer/grpo_trainer.py (_generate_and_score_completions, sum_then_normalize), copied:
    rewards = (rewards_per_func * reward_weights).nansum(dim=1); rewards[unscorable_mask] = nan."""
    unscorable_mask = torch.isnan(per_func).all(dim=1)
    rewards = (per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    return rewards


def test_the_total_is_trls_when_the_callables_are_the_whole_reward():
    a = torch.tensor([1.0, math.nan, 0.0, math.nan])
    b = torch.tensor([0.5, 0.25, math.nan, math.nan])
    ours = total(
        {"accuracy": torch.full((4,), math.nan), "a": a, "b": b}, {"accuracy": 0.0, "a": 1.0, "b": 2.0}, "accuracy"
    )
    theirs = trl_rewards(torch.stack([a, b], 1), torch.tensor([1.0, 2.0]))
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.allclose(ours.nan_to_num(), theirs.nan_to_num())
    assert ours.tolist()[:3] == [2.0, 0.5, 0.0]


def test_a_weighted_verifier_that_cannot_judge_still_makes_the_row_undefined():
    acc, fmt = torch.tensor([math.nan, 1.0]), torch.tensor([1.0, 1.0])
    assert total({"accuracy": acc, "format": fmt}, {"accuracy": 1.0, "format": 0.5}, "accuracy")[0].isnan()
    assert total({"accuracy": acc, "format": fmt}, {"accuracy": 0.0, "format": 0.5}, "accuracy")[0] == 0.5


def test_the_callables_get_trls_arguments_and_async_ones_run_together():
    seen = {}

    def acc(prompts, completions, solution, **kwargs):
        seen.update(prompts=prompts, completions=completions, solution=solution, **kwargs)
        return [1.0 if "3" in c[0]["content"] else 0.0 for c in completions]

    async def maybe(completions, level, **kwargs):
        return [None if lv == 0 else 0.5 for lv in level]

    texts = ["it is 3", "4", "3", "five"]
    v = run_verify(texts, _samples(), _funcs(acc, maybe, weights=[1.0, 2.0]), ids=[[5, 1]] * 4, step=7)
    assert seen["prompts"][0] == CHAT and seen["completions"][0] == [{"role": "assistant", "content": "it is 3"}]
    assert seen["solution"] == ["3"] * 4 and seen["level"] == [0, 1, 2, 3] and seen["completion_ids"][0] == [5, 1]
    assert seen["trainer_state"].global_step == 7 and callable(seen["log_metric"])
    assert v.per_func["acc"].tolist() == [1.0, 0.0, 1.0, 0.0] and math.isnan(v.per_func["maybe"][0])
    assert v.rewards.tolist() == [1.0, 1.0, 2.0, 1.0]  # None adds nothing: 1 + 2 * 0.5 where defined
    assert v.correct.tolist() == [False] * 4  # `accuracy` stays the verifier's (no </think> answer here)


def test_text_prompts_get_text_completions_and_a_task_without_columns_gives_its_gold():
    seen = {}

    def f(prompts, completions, solution, **kw):
        seen.update(prompts=prompts, completions=completions, solution=solution)
        return [0.0] * len(completions)

    run_verify(["a"], [Sample(prompt="2+1=?\n", gold="3")], _funcs(f))
    assert seen == {"prompts": ["2+1=?\n"], "completions": ["a"], "solution": ["3"]}


def test_an_async_callable_object_and_a_partial_are_awaited_and_named_as_trl_does(tmp_path):
    (tmp_path / "objs.py").write_text(
        "import functools\n"
        "class Judge:\n"
        "    async def __call__(self, completions, **kw):\n"
        "        return [0.25] * len(completions)\n"
        "judge = Judge()\n"
        "async def scaled(completions, scale, **kw):\n"
        "    return [scale] * len(completions)\n"
        "half = functools.partial(scaled, scale=0.5)\n"
    )
    judge, half = (load_reward_func(f"{tmp_path / 'objs.py'}:{n}") for n in ("judge", "half"))
    assert (judge.name, judge.is_async, half.name, half.is_async) == ("Judge", True, "scaled", True)
    funcs = RewardFuncs(BuiltinVerifier(), 0.0, callables={"Judge": (judge, 1.0), "scaled": (half, 1.0)})
    assert run_verify(["a"], _samples(1), funcs).rewards.tolist() == [0.75]


def test_one_event_loop_serves_every_async_call():
    import asyncio

    loops = []

    async def f(completions, **kw):
        loops.append(asyncio.get_running_loop())
        return [0.0] * len(completions)

    for _ in range(2):
        run_verify(["a"], _samples(1), _funcs(f))
    assert loops[0] is loops[1]  # an async client bound to the loop keeps working across steps


@pytest.mark.parametrize(
    "out, needle",
    [
        ([1.0], "returned 1 values"),
        ("1.0", "returned '1.0'"),
        ([1.0, "x", 0.0, 0.0], "returned 'x' \\(a str\\) among its rewards"),
        ([1.0, math.inf, 0.0, 0.0], "returned inf"),
        (None, "returned None"),
    ],
)
def test_a_reward_function_that_breaks_the_contract_is_named(out, needle):
    def bad(completions, **kw):
        return out

    with pytest.raises(UserError, match=f"'m:bad' {needle}"):
        run_verify(["a"] * 4, _samples(), _funcs(bad))


def test_nan_numpy_and_tensor_results_are_taken_as_trl_takes_them():
    import numpy as np

    def f(completions, **kw):
        return np.array([np.nan, 1.0, 0.0, 1.0])

    def g(completions, **kw):
        return torch.tensor([1.0, 1.0, 0.0, 0.0])

    v = run_verify(["a"] * 4, _samples(), _funcs(f, g))
    assert v.rewards.tolist() == [1.0, 2.0, 0.0, 1.0]


def test_a_reward_function_that_raises_or_wants_a_missing_column_is_named():
    def boom(completions, **kw):
        raise ValueError("cannot parse")

    def needs(completions, difficulty):
        return [0.0]

    with pytest.raises(UserError, match="'m:boom' raised: ValueError: cannot parse"):
        run_verify(["a"], _samples(1), _funcs(boom))
    with pytest.raises(UserError, match="cannot be called with what the data gives it.*level"):
        run_verify(["a"], _samples(1), _funcs(needs))


def test_the_start_up_try_refuses_a_function_the_data_cannot_call():
    def needs(completions, difficulty, **kw):
        return [0.0] * len(completions)

    funcs = _funcs(needs).callables
    with pytest.raises(UserError, match="cannot be called with what the data gives it.*level"):
        try_callables(funcs, _samples(2))


def test_loading_by_path_and_by_module_name(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def accuracy(completions, **kw):\n    return [1.0] * len(completions)\n")
    assert load_reward_func(f"{tmp_path / 'my_rewards.py'}:accuracy").fn(completions=[1]) == [1.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_func("my_rewards:accuracy").name == "accuracy"
    with pytest.raises(UserError, match="not MODULE:FUNCTION"):
        load_reward_func("my_rewards")
    with pytest.raises(UserError, match="there is no file"):
        load_reward_func(f"{tmp_path / 'nope.py'}:accuracy")
    with pytest.raises(UserError, match="has no function 'acc'.*accuracy"):
        load_reward_func("my_rewards:acc")


def test_weights_must_match_and_a_taken_name_keeps_its_spec(tmp_path):
    path = tmp_path / "r.py"
    path.write_text("def accuracy(completions, **kw):\n    return [0.0] * len(completions)\n")
    cfg = OmegaConf.create({"reward_funcs": [f"{path}:accuracy"], "reward_weights": [1.0, 2.0]})
    with pytest.raises(UserError, match="2 weight\\(s\\) for 1 verify.reward_funcs"):
        build_callables(cfg, {"accuracy"})
    cfg.reward_weights = None
    assert list(build_callables(cfg, {"accuracy"})) == [f"{path}:accuracy"]  # never over the verifier's metrics


def test_the_start_up_line_says_what_still_reads_the_verifier():
    cfg = OmegaConf.create(
        {
            "verify": {"name": "math", "weight": 0.0, "format_weight": 0.0, "reward_funcs": ["r.py:acc"]},
            "redistribute": {"name": "rredcot"},
        }
    )
    line = only_callables_note(cfg)
    assert "verify.reward_funcs alone (acc" in line and "math verifier" in line and "redistribute=rredcot" in line
    cfg.verify.weight = 1.0
    assert only_callables_note(cfg) is None


def test_a_run_directorys_reward_functions_are_never_imported_unless_named(tmp_path):
    saved = OmegaConf.create({"plugins": [], "verify": {"reward_funcs": ["/x/r.py:acc"]}})
    with pytest.raises(UserError, match=r"names code to run: /x/r.py:acc.*'verify.reward_funcs=\[/x/r.py:acc\]'"):
        refuse_code_from(tmp_path, saved, [], [])
    refuse_code_from(tmp_path, saved, [], ["verify.reward_funcs=[/x/r.py:acc]"])  # the user's own choice


def test_a_batch_with_no_defined_reward_is_said_once(capsys):
    import rredcot.stages.verify as verify

    verify._told.discard("all_none")

    def none(completions, **kw):
        return [None] * len(completions)

    for _ in range(2):
        assert run_verify(["a", "b"], _samples(2), _funcs(none)).rewards.isnan().all()
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("every reward was undefined (None) for all 2 completions") == 1
