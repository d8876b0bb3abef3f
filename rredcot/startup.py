"""What training checks and says before the first step: the longest prompt a step can take, the task's
training and held-out sets (disjoint, long prompts counted), and one line for each default that does not
apply as a user would assume. `rredcot train`, `eval` and `credit` share these."""

from __future__ import annotations

from omegaconf import DictConfig

from rredcot.errors import UserError, brief
from rredcot.registry import get
from rredcot.stages.reward_funcs import only_callables_note
from rredcot.stages.segment import think_marker
from rredcot.task.hub import source_of
from rredcot.task.model import is_builtin
from rredcot.task.rows import check_samples
from rredcot.task.splits import check_disjoint, drop_long_prompts
from rredcot.types import Sample
from rredcot.ui import note


def startup_notes(cfg: DictConfig, tokenizer) -> None:
    """One line for each default that does not apply as a user would assume (never silently)."""
    if cfg.task.get("verifier") and cfg.verify.name != cfg.task.verifier:
        note(f"verify.name={cfg.verify.name} scores this run, not the task's own verifier ({cfg.task.verifier}).")
    if only_callables_note(cfg):
        note(only_callables_note(cfg))
    for line in loss_notes(cfg):
        note(line)
    marker = think_marker(cfg)
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    if marker is None:
        note(
            f"model.think_end is empty: {cfg.model.name} answers without thinking, so every trace is segmented whole, "
            "the correction on its last segment."
        )
    elif len(ids) != 1:
        note(
            f"the tokenizer has no {marker} token (it is {len(ids)} tokens here): the end of thinking is found in "
            f"the text; traces that never write it are segmented whole, the correction on their last segment."
        )
    if cfg.task.get("chat_template") and not getattr(tokenizer, "chat_template", None):
        note("task.chat_template=true, but the model's tokenizer has no chat template: prompts are plain text.")
    if not is_builtin(cfg.model.name) and cfg.warmstart.enabled:
        note(
            f"warmstart.enabled=true applies to the built-in model only: {cfg.model.name} starts from its own weights."
        )
    carved = cfg.task.get("sources") is not None and source_of(cfg.task, "dev") is None
    if carved and "dev" in [cfg.eval.split, *cfg.eval.extra_splits]:
        note(
            f"the dev split is {cfg.task.dev_size} rows carved out of the training rows (by question hash); "
            "they are never trained on."
        )


def loss_notes(cfg: DictConfig) -> list[str]:
    """The combinations TRL 1.16.0 warns of (grpo_trainer.py, GRPOTrainer.__init__), and dynamic sampling over
    credit that all-equal groups still carry. Example: loss_type=luspo at token level -> one line."""
    upd, out = cfg["update"], []
    level, loss = upd.get("importance_sampling_level", "token"), upd.loss_type
    if loss == "luspo" and level != "sequence":
        out.append("update.loss_type=luspo is meant for update.importance_sampling_level=sequence (the paper's setup).")
    if loss == "vespo" and level != "token":
        out.append(
            "update.loss_type=vespo makes its own sequence weight: update.importance_sampling_level=token fits it."
        )
    if level == "sequence" and loss in ("bnpo", "dr_grpo", "dapo", "cispo"):
        out.append(
            f"update.importance_sampling_level=sequence with loss_type={loss} sums per-token terms, so each completion "
            "weighs by its length; GSPO's own setup is update.loss_type=grpo."
        )
    red = cfg.redistribute
    if cfg.train.get("dynamic_sampling") and red.get("equal_groups") == "keep" and red.get("mode") != "reweight":
        out.append(
            f"train.dynamic_sampling=true drops groups whose rewards are all equal, but redistribute={red.name} "
            "(equal_groups=keep) gives their traces credit: that signal is dropped too (docs/training.md)."
        )
    return out


def prompt_limit(cfg: DictConfig, model) -> int:
    """The longest prompt a step can take: train.max_prompt_tokens, within the model's context less the
    completion budget."""
    context = model_context(model)
    if context is not None and cfg.rollout.max_new_tokens >= context:
        raise UserError(
            f"rollout.max_new_tokens={brief(cfg.rollout.max_new_tokens)} leaves no room for a prompt in the model's "
            f"context of {context} positions. Lower it (e.g. rollout.max_new_tokens={max(context // 4, 1)})."
        )
    cap = cfg.train.max_prompt_tokens
    return PromptLimit(min(cap, context - cfg.rollout.max_new_tokens) if context else cap, context)


class PromptLimit(int):
    """A prompt limit that remembers the model's context, so that a message about long prompts can name the
    knob that binds (task_sets takes the limit from callers that know nothing of contexts)."""

    context: int | None

    def __new__(cls, value: int, context: int | None):
        limit = super().__new__(cls, value)
        limit.context = context
        return limit


def model_context(model) -> int | None:
    """The model's context in positions (config.max_position_embeddings), None when it declares none."""
    context = getattr(model.config, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


def long_prompt_advice(cfg: DictConfig, context: int | None):
    """The fix for too many prompts over the limit, naming the knob that binds with a value that works:
    `needed` tokens must fit in train.max_prompt_tokens and, with the completion, in the model's context."""
    new, cap = cfg.rollout.max_new_tokens, cfg.train.max_prompt_tokens

    def advice(needed: int | None) -> str:
        if needed is None:
            return "Shorten the prompts."
        if context is not None and needed >= context:
            return (
                f"Enough of them to train on need {needed} tokens, and the model's whole context is {context} "
                "positions: shorten the prompts, or use a model with a longer context."
            )
        sets = [f"train.max_prompt_tokens={needed}"] if needed > cap else []
        if context is not None and needed + new > context:
            sets.append(f"rollout.max_new_tokens={context - needed}")
        why = (
            f" (the model's context of {context} positions holds the prompt and the {new} completion tokens "
            "rollout.max_new_tokens allows now)"
            if context is not None and needed + new > context
            else ""
        )
        return f"Set {' '.join(sets)}{why}, or shorten the prompts."

    return advice


def task_sets(cfg: DictConfig, tokenizer, limit: int | None = None) -> tuple[list[Sample], dict[str, list[Sample]]]:
    """(training samples, held-out sets): eval.split first (logged as eval/...), then eval.extra_splits
    (eval_<split>/...). A held-out set that shares prompts with training is refused (check_disjoint);
    prompts longer than `limit` tokens are skipped and counted (drop_long_prompts)."""
    task = get("task", cfg.task.name)
    max_bad = cfg.task.get("max_bad_fraction", 0.01)
    advice = long_prompt_advice(cfg, getattr(limit, "context", None))

    def load(split: str) -> list[Sample]:
        samples = check_samples(cfg.task.name, split, task(cfg.task, split, tokenizer))
        if not limit:
            return samples
        return drop_long_prompts(samples, tokenizer, limit, f"the {split} split", max_bad, advice)

    splits = [cfg.eval.split] + [s for s in cfg.eval.extra_splits if s != cfg.eval.split]
    held_out = {s: load(s)[: cfg.eval.n_prompts] for s in splits}
    for split, samples in held_out.items():
        if len(samples) < cfg.eval.n_prompts:
            note(
                f"eval.n_prompts={cfg.eval.n_prompts}, but the {split} split has {len(samples)} prompts: every number "
                f"on {split} is over {len(samples)}."
            )
    train = check_disjoint(load("train"), held_out)
    if not train:
        raise UserError(
            f"The task {cfg.task.name!r} has no training rows left (check task.sources.train and task.train_size)."
        )
    return train, held_out
