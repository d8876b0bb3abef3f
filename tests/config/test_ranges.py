"""Every numeric or choice key of every shipped config has a range rule, and every rule holds for the
shipped values: a new key cannot slip in unchecked, and the shipped configs are inside their own ranges."""

import pytest
from omegaconf import OmegaConf

from rredcot import ranges, registry
from rredcot.compose import groups, load_config

# Keys whose type check is the whole check: booleans, free text, paths, and mappings a user fills.
FREE = {
    "run_dir",
    "checkpoint",
    "cache_dir",
    "plugins",
    "logging.progress",
    "logging.tensorboard",
    "logging.wandb",
    "logging.wandb_project",
    "logging.project",
    "logging.run_name",
    "update.mask_truncated_completions",
    "update.gradient_checkpointing",
    "credit.against",
    "eval.split",
    "eval.extra_splits",
    "model.name",
    "model.think_end",
    "model.chat_template_kwargs",
    "task.chat_template_kwargs",
    "rollout.name",
    "verify.name",
    "verify.options",
    "segment.name",
    "redistribute.name",
    "update.loss_type",
    "task.name",
    "task.verifier",
    "task.instruction",
    "task.forcing_text",
    "task.closing_text",
    "task.shuffle",
    "task.chat_template",
    "task.path",
    "task.config_name",
    "task.question_field",
    "task.answer_field",
    "task.trace_field",
    "task.sources",
    "redistribute.include_reference",
    "redistribute.self_normalize",
    "redistribute.length_normalize",
    "warmstart.enabled",
}
CONFIGS = [[]] + [[f"{g}={o}"] for g, opts in groups().items() for o in opts if g != "debug"] + [["debug=fast"]]


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in FREE:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _rule(cfg, key):
    section, _, option = key.partition(".")
    if key in ranges.RULES:
        return ranges.RULES[key]
    stage = {"update": None}.get(section, section)
    if stage in registry.STAGES and option:
        name = cfg[section]["name"]
        return registry.entry(stage, name).rules.get(option)
    return None


@pytest.mark.parametrize("overrides", CONFIGS, ids=[" ".join(c) or "default" for c in CONFIGS])
def test_every_key_has_a_rule_and_the_shipped_value_is_in_range(overrides, request):
    if overrides == ["rollout=vllm"]:  # needs vLLM and CUDA at config time: the fake engine stands in
        request.getfixturevalue("fake_vllm")
    cfg = load_config(overrides)
    unchecked = []
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True)):
        if key in FREE or key.startswith("task.sources."):
            continue
        rule = _rule(cfg, key)
        if rule is None:
            unchecked.append(key)
        else:
            assert rule.ok(value), f"{key}={value!r} is shipped outside its own range: {rule.text}"
    assert not unchecked, f"keys without a range rule (add one to rredcot/ranges.py or the entry's rules): {unchecked}"


@pytest.mark.parametrize(
    "rule, good, bad",
    [
        (ranges.integer(1), [1, 7], [0, -1, 1.5, True, "3", None]),
        (ranges.integer(1, 25), [1, 25], [26, 0]),
        (ranges.POSITIVE, [1e-9, 3], [0, -1, float("inf"), float("nan"), False]),
        (ranges.number(0, 1, hi_open=True), [0, 0.999], [1, -0.1]),
        (ranges.one_of("constant", "cosine"), ["cosine"], ["linear", None]),
        (ranges.optional(ranges.COUNT), [None, 3], [0]),
        (ranges.list_of(ranges.COUNT, 1), [[1, 2]], [[], [0], "12"]),
    ],
)
def test_rules_accept_and_refuse_exactly(rule, good, bad):
    assert all(rule.ok(v) for v in good) and not any(rule.ok(v) for v in bad)
