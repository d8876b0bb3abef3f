"""The valid range or choices of every config value, checked before any work starts.

A value the type check lets through (an int where an int belongs) can still crash a run minutes
later (micro_batch_size=0) or quietly do something else (device=tpu). `RULES` lists every key of
train.yaml that the code reads; a registry entry carries the rules of its own options
(`register(stage, name, rules=...)`), so the keys of a segmenter, an estimator or a plug-in's task
are checked the same way. A value out of range is a UserError that says the range and an example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from omegaconf import ListConfig

from rredcot.errors import UserError, brief


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    text: str  # what a valid value is, as the message says it: "an integer >= 1"
    integral: bool = False  # only integers (a float where an int default was is refused, else it is fine)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: int | None = None) -> Rule:
    """An integer in [lo, hi] (no upper bound when hi is None)."""
    text = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    return Rule(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi), text, True
    )


def number(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A finite number in the interval; open ends exclude the bound."""
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    text = (
        "a number > 0"
        if (lo, lo_open, hi) == (0, True, math.inf)
        else "a number >= 0"
        if (lo, lo_open, hi) == (0, False, math.inf)
        else "a finite number"
        if (lo, hi) == (-math.inf, math.inf)
        else f"a number in {left}{lo:g}, {hi:g}{right}"
    )

    def ok(v: Any) -> bool:
        return _num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return Rule(ok, text)


def one_of(*choices: Any) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), rule.text + " (or null)")


def list_of(rule: Rule, min_len: int = 0) -> Rule:
    def ok(v: Any) -> bool:
        return isinstance(v, (list, tuple, ListConfig)) and len(v) >= min_len and all(rule.ok(x) for x in v)

    return Rule(ok, f"a list of {min_len}+ items, each {rule.text}" if min_len else f"a list, each item {rule.text}")


POSITIVE, NON_NEGATIVE, FRACTION = number(0, lo_open=True), number(0), number(0, 1)
COUNT, NATURAL = integer(1), integer(0)  # COUNT: at least one; NATURAL: 0 allowed (0 = off / none)
SEED = integer(0, 2**32 - 1)  # numpy's legacy seeding (accelerate's set_seed) takes no more

# Keys of conf/train.yaml outside the stage entries' own options. Checked when present.
RULES: dict[str, Rule] = {
    "seed": SEED,
    "device": one_of("auto", "cpu", "cuda"),
    "resume": one_of(True, False),
    "world_size": optional(COUNT),
    "rollout.group_size": integer(2),
    "rollout.max_new_tokens": COUNT,
    "rollout.temperature": POSITIVE,
    "rollout.top_p": number(0, 1, lo_open=True),
    "rollout.top_k": NATURAL,
    "rollout.chunk_size": COUNT,
    "verify.weight": number(),
    "verify.format_weight": NON_NEGATIVE,
    "verify.timeout_s": number(0, 86400),  # a day; a wait past ~24 days overflows the pipe's poll
    "verify.budget_s": NON_NEGATIVE,
    "verify.overlong_buffer": NATURAL,  # at most rollout.max_new_tokens (rredcot/checks.py)
    "verify.overlong_penalty": NON_NEGATIVE,
    "verify.reward_funcs": list_of(Rule(lambda v: isinstance(v, str) and ":" in v, "MODULE:FUNCTION")),
    "verify.reward_weights": optional(list_of(number())),
    "logging.report_to": list_of(one_of("tensorboard", "wandb", "trackio", "none")),  # rredcot/trackers.py
    "update.eps_low": NON_NEGATIVE,
    "update.eps_high": NON_NEGATIVE,
    "update.beta": NON_NEGATIVE,
    "update.num_iterations": COUNT,
    "update.steps_per_generation": COUNT,
    "update.micro_batch_size": COUNT,
    "update.micro_batch_tokens": optional(COUNT),  # a token budget per micro-batch; null: micro_batch_size rows
    "update.max_grad_norm": POSITIVE,
    "update.autocast": optional(one_of("bfloat16", "float16")),
    "update.is_cap": NON_NEGATIVE,
    "update.is_cap_min": NON_NEGATIVE,  # below is_cap (rredcot/checks.py)
    "update.is_mode": one_of("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
    "update.delta": optional(Rule(number(1, lo_open=True).ok, "a number > 1")),
    "update.importance_sampling_level": one_of("token", "sequence"),
    "update.off_policy_mask_threshold": optional(NON_NEGATIVE),
    "update.use_bias_correction_kl": one_of(True, False),
    "update.sapo_temperature_pos": POSITIVE,
    "update.sapo_temperature_neg": POSITIVE,
    "update.vespo_k_pos": NON_NEGATIVE,
    "update.vespo_lambda_pos": NON_NEGATIVE,
    "update.vespo_k_neg": NON_NEGATIVE,
    "update.vespo_lambda_neg": NON_NEGATIVE,
    "update.compile": one_of(True, False),
    "optim.lr": POSITIVE,
    "optim.beta1": number(0, 1, hi_open=True),
    "optim.beta2": number(0, 1, hi_open=True),
    "optim.weight_decay": NON_NEGATIVE,
    "optim.adam_eps": POSITIVE,
    "optim.warmup_steps": NATURAL,
    "optim.warmup_ratio": FRACTION,
    "optim.schedule": one_of("constant", "cosine"),
    "train.steps": NATURAL,
    "train.generation_batch_size": COUNT,
    "train.dynamic_sampling": one_of(True, False),
    "train.max_extra_generation_batches": NATURAL,
    "train.log_every": COUNT,
    "train.eval_every": NATURAL,
    "train.save_every": NATURAL,
    "train.save_total_limit": NATURAL,
    "train.samples_per_log": NATURAL,
    "train.max_nonfinite_steps": COUNT,
    "train.max_prompt_tokens": COUNT,
    "train.collapse_drop": FRACTION,
    "train.collapse_window": COUNT,
    "train.collapse_clip": FRACTION,
    "train.critic_lag": NATURAL,
    "eval.n_prompts": COUNT,
    "eval.n_samples": COUNT,
    "eval.ks": list_of(COUNT, 1),
    "eval.temperature": POSITIVE,
    "credit.prompts": COUNT,
    "credit.show": NATURAL,
    "credit.mc_samples": COUNT,
    "credit.estimators": list_of(Rule(lambda v: isinstance(v, str), "a name"), 1),
    "credit.segmenters": list_of(Rule(lambda v: isinstance(v, str), "a name")),
    "warmstart.examples": COUNT,
    "warmstart.steps": NATURAL,
    "warmstart.batch_size": COUNT,
    "warmstart.lr": POSITIVE,
    "warmstart.flaw_rate": FRACTION,
    "warmstart.misconception_frac": FRACTION,
    "warmstart.misconception_rate": FRACTION,
    "warmstart.seed": SEED,
    "model.dtype": one_of("float32", "bfloat16", "float16"),
    "model.trust_remote_code": one_of(True, False),
    "model.arch": one_of("llama", "qwen2"),
    "model.hidden_size": COUNT,
    "model.intermediate_size": COUNT,
    "model.layers": COUNT,
    "model.heads": COUNT,
    "model.max_positions": integer(2),
    "model.lora.r": NATURAL,
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": number(0, 1, hi_open=True),
    "model.lora.target_modules": list_of(Rule(lambda v: isinstance(v, str) and v != "", "a module name"), 1),
}


def check(values: Mapping[str, Any], rules: Mapping[str, Rule], prefix: str = "") -> None:
    """Each rule whose key is in `values` (dotted keys look inside nested mappings) must hold."""
    missing = object()
    for key, rule in rules.items():
        v: Any = values
        for part in key.split("."):
            v = v.get(part, missing) if hasattr(v, "get") else missing
        if v is missing or rule.ok(v):
            continue
        raise UserError(
            f"{prefix}{key}={brief(v)} is out of range: it must be {rule.text}. Set it on the command line "
            f"({prefix}{key}=...) or in your config; `rredcot config show` prints the current values."
        )
