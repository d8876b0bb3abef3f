"""Every config composes and validates; bad input gives one clear UserError (the CLI's exit status 2)."""

import pytest
from omegaconf import OmegaConf

from rredcot.assemble import build_stages
from rredcot.compose import groups, load_config
from rredcot.errors import UserError

GROUP_OPTIONS = [(g, o) for g, opts in groups().items() if g != "exp" for o in opts]


def test_default_composes_and_builds():
    cfg = load_config([])
    assert cfg.task.name == "builtin" and cfg.segment.name == "hybrid" and cfg.redistribute.name == "rredcot"
    assert cfg["update"].loss_type == "dapo"
    build_stages(cfg)


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option, request):
    if (group, option) == ("rollout", "vllm"):  # needs vLLM and CUDA at config time: the fake engine stands in
        request.getfixturevalue("fake_vllm")
    cfg = load_config([f"{group}={option}"])
    build_stages(cfg)


@pytest.mark.parametrize("exp", groups()["exp"])
def test_every_exp_composes(exp):
    cfg = load_config([f"+exp={exp}"])
    build_stages(cfg)
    # a pretrained model is never warm-started (the warm start trains the built-in model only)
    assert cfg.model.name == "builtin" or cfg.warmstart.enabled is False


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("exp", groups()["exp"])
@pytest.mark.parametrize("order", ["debug first", "exp first"])
def test_debug_fast_wins_over_every_exp(exp, order):
    # `+exp=gsm8k debug=fast` once composed to 500 steps of 512 tokens (~20 h here): debug must win.
    import yaml

    from rredcot.compose import config_dir

    overrides = ["debug=fast", f"+exp={exp}"] if order == "debug first" else [f"+exp={exp}", "debug=fast"]
    cfg = load_config(overrides)
    fast = yaml.safe_load((config_dir() / "debug" / "fast.yaml").read_text())
    for key, value in _leaves(fast):
        assert OmegaConf.select(cfg, key) == value, f"{key} with +exp={exp} debug=fast"


def test_exp_without_plus_is_the_same_as_with():
    assert load_config(["exp=gsm8k"]) == load_config(["+exp=gsm8k"])


@pytest.mark.parametrize("task, verifier", [("builtin", "builtin"), ("gsm8k", "gsm8k"), ("math500", "math")])
def test_a_task_brings_its_verifier(task, verifier):
    # `task=gsm8k` alone once kept the built-in verifier: every GSM8K answer scored 0 or undefined.
    assert load_config([f"task={task}"]).verify.name == verifier


def test_an_explicit_verifier_still_wins():
    assert load_config(["task=gsm8k", "verify.name=math"]).verify.name == "math"


def test_only_hydra_searchpath_among_hydra_keys():
    assert "hydra.searchpath" in _error(["hydra.run.dir=/tmp/x"])


def test_debug_fast_is_small():
    cfg = load_config(["debug=fast"])
    assert cfg.train.steps <= 5 and cfg.warmstart.steps <= 50


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo", "vespo"])
def test_loss_types_compose(loss_type):
    assert load_config([f"update.loss_type={loss_type}"])["update"].loss_type == loss_type


def test_cispo_needs_its_own_cap():
    # cispo caps the ratio itself at eps_high (TRL's epsilon_high): our 0.2 would shrink every gradient
    assert "update.eps_high=5.0" in _error(["update.loss_type=cispo"])
    assert load_config(["update.loss_type=cispo", "update.eps_high=5.0"])["update"].loss_type == "cispo"


@pytest.mark.parametrize(
    "overrides, said",
    [
        (["update.is_cap_min=2.5"], "must be below update.is_cap=2.0"),
        (["update.is_mode=sequence"], "token_truncate, token_mask, sequence_truncate, sequence_mask"),
        (["update.loss_type=vespo", "update.is_mode=sequence_mask"], "update.is_mode=token_truncate"),
        (["update.importance_sampling_level=row"], "one of token, sequence"),
        (["update.delta=0.9"], "a number > 1 (or null)"),
        (["verify.overlong_buffer=49"], "longer than rollout.max_new_tokens=48"),
        (["train.max_extra_generation_batches=-1"], "an integer >= 0"),
    ],
)
def test_trl_and_dapo_options_are_checked_at_config_time(overrides, said):
    assert said in _error(overrides)


def _error(overrides) -> str:
    with pytest.raises(UserError) as e:
        load_config(overrides)
    return str(e.value)


def test_unknown_key_suggests_the_closest():
    msg = _error(["rollout.temprature=0.8"])
    assert (
        "Unknown config key 'rollout.temprature'" in msg
        and "rollout.temperature" in msg
        and "+rollout.temprature" in msg
    )


def test_wrong_type():
    msg = _error(["rollout.temperature=hot"])
    assert "wrong type" in msg and "expected number" in msg
    assert "expected int" in _error(["rollout.group_size=2.5"])
    assert "expected bool" in _error(["update.mask_truncated_completions=maybe"])


def test_int_where_float_is_fine():
    assert load_config(["rollout.temperature=1"]).rollout.temperature == 1


def test_new_key_needs_a_plus_and_with_it_composes():
    assert "+train.note" in _error(["train.note=hello"])
    assert load_config(["+train.note=hello"]).train.note == "hello"


def test_unknown_group_option_lists_the_options():
    msg = _error(["algo=ppo"])
    assert "grpo" in msg


def test_group_size_below_two():
    assert "at least 2" in _error(["rollout.group_size=1"])


def test_generation_batch_not_whole_groups():
    msg = _error(["train.generation_batch_size=30", "rollout.group_size=8"])
    assert "whole number of groups" in msg and "train.generation_batch_size=24" in msg


def test_micro_batch_must_divide():
    assert "micro_batch_size" in _error(["train.generation_batch_size=64", "update.micro_batch_size=48"])


def test_unknown_registry_name():
    msg = _error(["verify.name=gsm9k"])
    assert "Did you mean 'gsm8k'" in msg and "verify.name" in msg


def test_out_of_range():
    assert "rollout.temperature" in _error(["rollout.temperature=0"])
    assert "eval.n_samples" in _error(["eval.n_samples=2", "eval.ks=[1,4]"])


def test_bad_override_syntax():
    assert "key=value" in _error(["rollout.temperature=[1,"])


def test_an_estimator_that_needs_the_forcing_text_says_so():
    msg = _error(["~task.forcing_text"])
    assert "needs task.forcing_text" in msg and "algo=grpo" in msg
    load_config(["~task.forcing_text", "algo=grpo"])  # GRPO does not need it


def test_held_out_splits_are_dev_or_test():
    with pytest.raises(UserError, match="held-out splits are dev and test"):
        load_config(["eval.extra_splits=[valid]"])
    with pytest.raises(UserError, match="train is"):
        load_config(["eval.split=train"])
    assert list(load_config(["eval.split=dev", "eval.extra_splits=[test]"]).eval.extra_splits) == ["test"]
