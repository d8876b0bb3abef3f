"""The one place that checks a composed config, before any model, data or process group is loaded.

Every failure is a UserError naming the key, the problem and the fix (exit status 2). `validate` is
what the config alone decides (ranges, batch arithmetic, registry names, each entry's own options, at
the launcher's world size), run once when a config is composed; `check_config` adds what the launch
decides (the world size it recorded, whether the model is sharded), run once by the trainer before anything
loads. How the config is composed from a command line (unknown keys, types) is rredcot/compose.py.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from rredcot import batch_fit, ranges, registry
from rredcot.errors import UserError, brief
from rredcot.estimator_spec import estimator_spec
from rredcot.sections import rollout_options, stage_options

# (registry stage, the config key that names its entry). The loss aggregator's stage is "loss"; its key
# stays update.loss_type (the update section configures the whole update, not only the loss).
ENTRY_KEYS = [
    ("rollout", "rollout.name"),
    ("verify", "verify.name"),
    ("segment", "segment.name"),
    ("redistribute", "redistribute.name"),
    ("loss", "update.loss_type"),
    ("task", "task.name"),
]


def check_config(cfg: DictConfig, *, world_size: int, will_shard: bool = False) -> int:
    """What the launch decides, on a config that `validate` already passed when it was composed (load_config,
    or the run's own config on resume): world_size=N on the command line must be the launched one, the
    launched ranks must share each step evenly, and a sharded model (FSDP2 / ZeRO-3) refuses what it cannot
    run. Returns the world size (the run records it in config.yaml)."""
    check_world_size(cfg, world_size)
    check_data_parallel(cfg, world_size)
    if will_shard:
        check_shardable(cfg)
    return world_size


def validate(cfg: DictConfig, check_entries: bool = True, world_size: int | None = None) -> None:
    """Ranges and batch arithmetic; registry names (unknown ones list the valid names) and each entry's options.

    world_size: the processes that will share each step (default: the launcher's WORLD_SIZE)."""
    if cfg.verify.name is None:
        raise UserError(
            f"The task {cfg.task.name!r} names no verifier: add `verifier: NAME` to its config (the answer "
            "checker that scores it, e.g. builtin, gsm8k, math or a plug-in's), or set verify.name=NAME."
        )
    _check_batches(cfg)
    check_data_parallel(cfg, world_size)
    _check_loss_options(cfg)
    if max(cfg.eval.ks) > cfg.eval.n_samples:
        raise UserError(
            f"eval.ks={list(cfg.eval.ks)} asks for pass@{max(cfg.eval.ks)}, but eval.n_samples={cfg.eval.n_samples} "
            f"completions are sampled per prompt: set eval.n_samples={max(cfg.eval.ks)} or drop the larger k."
        )
    if cfg.credit.against not in (None, "mc"):
        raise UserError(
            f"credit.against={cfg.credit.against!r}: the only reference is mc (credit.against=mc), or null for none."
        )
    for split in [cfg.eval.split, *cfg.eval.extra_splits]:
        if split not in ("dev", "test"):
            raise UserError(
                f"eval.split / eval.extra_splits name {split!r}: held-out splits are dev and test (train is "
                "for training). Choose settings with eval.split=dev and keep test for the final numbers, "
                "e.g. eval.split=dev eval.extra_splits=[test]."
            )
    for stage, key in ENTRY_KEYS:
        registry.check(stage, OmegaConf.select(cfg, key), key)
    for entry in cfg.credit.estimators:
        registry.check("redistribute", estimator_spec(entry)[0], "credit.estimators")
    for name in cfg.credit.segmenters:
        registry.check("segment", name, "credit.segmenters")
    if check_entries:
        _check_entries(cfg)


def _check_batches(cfg: DictConfig) -> None:
    """A step's completions are whole groups, split into whole optimizer steps of whole micro-batches."""
    g, n = cfg.rollout.group_size, cfg.train.generation_batch_size
    if g < 2:
        raise UserError(
            f"rollout.group_size={g}: GRPO compares completions of one prompt, so a group needs at least 2. "
            "Set rollout.group_size=2 or more (8 is typical)."
        )
    ranges.check(cfg, ranges.RULES)
    spg, micro = cfg["update"].steps_per_generation, cfg["update"].micro_batch_size
    fix = batch_fit.either(batch_fit.fixes(n, g, spg, micro))
    if n % g:
        raise UserError(
            f"train.generation_batch_size={brief(n)} is not a whole number of groups of rollout.group_size={g}. "
            f"Make it a multiple of {g} that also splits into the update's micro-batches: {fix}."
        )
    if not batch_fit.fits(n, g, spg, micro):
        raise UserError(
            f"Each generation batch of {brief(n)} completions is split into update.steps_per_generation={spg} "
            f"optimizer steps of micro-batches of update.micro_batch_size={micro}, so {brief(n)} must be a whole "
            f"multiple of {spg} x {micro}. Set {fix}."
        )


def _check_loss_options(cfg: DictConfig) -> None:
    """What the ranges cannot say alone: bounds in order, the overlong buffer within the completion budget, and
    the two loss-type combinations that do something else than asked (TRL 1.16.0 refuses the second too)."""
    upd, budget = cfg["update"], cfg.rollout.max_new_tokens
    if upd.is_cap > 0 and upd.is_cap_min >= upd.is_cap:
        raise UserError(
            f"update.is_cap_min={upd.is_cap_min} must be below update.is_cap={upd.is_cap} (the importance weight's "
            "bounds, TRL's vllm_importance_sampling_clip_min and clip_max). Lower is_cap_min (0 = no lower bound)."
        )
    if cfg.verify.overlong_buffer > budget:
        raise UserError(
            f"verify.overlong_buffer={cfg.verify.overlong_buffer} is longer than rollout.max_new_tokens={budget}: the "
            f"penalty covers the last overlong_buffer tokens of the budget. Set verify.overlong_buffer={budget // 4} "
            "(DAPO: 4096 of 20480), or 0 for no overlong shaping."
        )
    if upd.loss_type == "cispo" and upd.eps_high <= 1:
        raise UserError(
            f"update.loss_type=cispo caps the importance ratio itself at update.eps_high={upd.eps_high} (TRL's "
            "epsilon_high, ScaleRL's eps_max), which scales every token's gradient down. Set update.eps_high=5.0 "
            "(ScaleRL's value)."
        )
    if upd.loss_type == "vespo" and upd.is_mode.startswith("sequence") and upd.is_cap > 0:
        raise UserError(
            f"update.loss_type=vespo folds the sampler's token weights into its own sequence weight, so "
            f"update.is_mode={upd.is_mode} has no meaning for it (TRL 1.16 refuses it too). Set "
            "update.is_mode=token_truncate or token_mask."
        )


def check_data_parallel(cfg: DictConfig, world: int | None = None) -> None:
    """Under W processes each rank owns whole prompt groups: W must divide the prompts per step, and each
    rank's share of an optimizer step must be whole micro-batches (micro_batch_size is per process)."""
    from rredcot.collectives import env_world_size  # here: collectives imports torch, `config show` need not

    w = world or env_world_size()
    g, n = cfg.rollout.group_size, cfg.train.generation_batch_size
    spg, micro = cfg["update"].steps_per_generation, cfg["update"].micro_batch_size
    if w == 1 or batch_fit.fits(n, g, spg, micro, w):
        return
    fix = batch_fit.either(batch_fit.fixes(n, g, spg, micro, w))
    worlds = batch_fit.either(batch_fit.world_fixes(n, g, spg, micro, most=min(n // g, 64)))
    prompts = n // g
    if prompts % w:
        raise UserError(
            f"{w} processes share each step's {prompts} prompts (train.generation_batch_size={n} / rollout."
            f"group_size={g}), and every process must own whole prompt groups. Set {fix}, or launch a number "
            f"of processes that fits this batch ({worlds or 'none does'})."
        )
    raise UserError(
        f"On {w} processes each one's share of a step is {n} / {w} = {n // w} completions, which "
        f"update.steps_per_generation={spg} optimizer steps do not split into whole micro-batches of "
        f"update.micro_batch_size={micro} (a per-process size). Set {fix}"
        + (f", or launch {worlds} processes." if worlds else ".")
    )


def check_world_size(cfg: DictConfig, world: int) -> int:
    """The launched world size (recorded in the run's config.yaml); world_size=N on the command line must match it."""
    if cfg.get("world_size") not in (None, world):
        raise UserError(
            f"world_size={cfg.world_size} was set, but {world} process(es) were launched. world_size is recorded, "
            f"not chosen: launch with torchrun --nproc_per_node {cfg.world_size} (or accelerate launch "
            "--num_processes N), and leave world_size unset."
        )
    return world


def check_shardable(cfg: DictConfig) -> None:
    """What FSDP2 / ZeRO-3 cannot run: a second, unsharded copy of the policy (critic_lag), or an estimator whose
    backward passes (a different number per rank) would each be a collective."""
    if cfg.train.get("critic_lag", 0):
        raise UserError(
            f"train.critic_lag={cfg.train.critic_lag} keeps a second, frozen copy of the policy, which is not "
            "sharded under FSDP or ZeRO-3. Use train.critic_lag=0 with these configs, or DDP (torchrun)."
        )
    if registry.entry("redistribute", cfg.redistribute.name).runs_backward:
        raise UserError(
            f"redistribute={cfg.redistribute.name} runs a backward pass per trace, and under FSDP or ZeRO-3 "
            "each would be a collective that ranks with other trace counts never join. Use it with DDP "
            "(torchrun, or conf/accelerate/ddp.yaml), or choose another estimator."
        )


def _check_entries(cfg: DictConfig) -> None:
    """Each chosen entry's own options (imports the stage modules, so torch): names it takes, ranges."""
    from rredcot.stages.verify import build_reward_funcs
    from rredcot.task.model import check_shape, is_builtin
    from rredcot.trackers import check_installed

    registry.check_options("rollout", cfg.rollout.name, rollout_options(cfg.rollout)[1], "rollout.")
    for stage in ("segment", "redistribute"):
        registry.check_options(stage, cfg[stage].name, stage_options(cfg[stage]), f"{stage}.")
    registry.check_options("task", cfg.task.name, OmegaConf.create(stage_options(cfg.task)), "task.", keywords=False)
    for entry in cfg.credit.estimators:  # a variant's options: names the estimator takes, values in range
        name, opts = estimator_spec(entry)
        registry.check_options("redistribute", name, opts, f"credit.estimators {entry!r}: ")
    build_reward_funcs(cfg.verify)  # a verifier checks its own options when it is built
    check_installed(cfg)  # the trackers' packages, before any work
    if is_builtin(cfg.model.name):  # a pretrained model brings its own shape
        check_shape(cfg.model)
    for stage, key in ENTRY_KEYS:
        name = OmegaConf.select(cfg, key)
        for need in registry.entry(stage, name, key).needs_task_keys:  # e.g. answer forcing needs task.forcing_text
            if cfg.task.get(need) is None:
                raise UserError(
                    f"{key}={name} needs task.{need}, which this task's config does not set. "
                    f"Add it to the task config (see conf/task/*.yaml for examples) or pass +task.{need}=..., "
                    "or choose another estimator (e.g. algo=grpo)."
                )
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                "device=cuda, but torch sees no CUDA GPU here (a CPU-only torch build, or no driver). "
                "Use device=auto (a GPU when there is one) or device=cpu."
            )
