"""What training checks and says before the first step: the longest prompt a step can take, the task's
training and held-out sets (disjoint, long prompts counted), and one line for each default that does not
apply as a user would assume. `rredcot train`, `eval` and `credit` share these."""

from __future__ import annotations

from omegaconf import DictConfig

from rredcot.errors import UserError
from rredcot.registry import get
from rredcot.stages.segment import think_marker
from rredcot.task.hub import source_of
from rredcot.task.model import is_builtin
from rredcot.task.splits import check_disjoint, drop_long_prompts
from rredcot.types import Sample
from rredcot.ui import note


def startup_notes(cfg: DictConfig, tokenizer) -> None:
    """One line for each default that does not apply as a user would assume (never silently)."""
    if cfg.task.get("verifier") and cfg.verify.name != cfg.task.verifier:
        note(f"verify.name={cfg.verify.name} scores this run, not the task's own verifier ({cfg.task.verifier}).")
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


def prompt_limit(cfg: DictConfig, model) -> int:
    """The longest prompt a step can take: train.max_prompt_tokens, within the model's context less the
    completion budget."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and cfg.rollout.max_new_tokens >= context:
        raise UserError(
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {context} positions. Lower it (e.g. rollout.max_new_tokens={context // 4})."
        )
    return (
        min(cfg.train.max_prompt_tokens, context - cfg.rollout.max_new_tokens)
        if context
        else cfg.train.max_prompt_tokens
    )


def task_sets(cfg: DictConfig, tokenizer, limit: int | None = None) -> tuple[list[Sample], dict[str, list[Sample]]]:
    """(training samples, held-out sets): eval.split first (logged as eval/...), then eval.extra_splits
    (eval_<split>/...). A held-out set that shares prompts with training is refused (check_disjoint);
    prompts longer than `limit` tokens are skipped and counted (drop_long_prompts)."""
    task = get("task", cfg.task.name)
    max_bad = cfg.task.get("max_bad_fraction", 0.01)

    def load(split: str) -> list[Sample]:
        samples = task(cfg.task, split, tokenizer)
        return drop_long_prompts(samples, tokenizer, limit, f"the {split} split", max_bad) if limit else samples

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
