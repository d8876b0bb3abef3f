"""A run directory is the source of truth for every command that reads it (`eval`, `credit`).

`train` saves the resolved config (config.yaml) and the command line that made it (overrides.yaml).
A later command starts from the saved config; the overrides it is given are applied as the change
they make to the run's own composition, and every key they change is said in one line at start-up,
so a GSM8K checkpoint is never quietly scored on the built-in task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from rredcot.errors import UserError

OVERRIDES_FILE = "overrides.yaml"
RUN_CONFIG = "run_config.yaml"  # in each checkpoint: the run's config.yaml as it was when the step was saved
# Keys that say where and how a command runs, not what the run was: changing them is not worth a note.
_QUIET = ("checkpoint", "run_dir", "resume", "logging.", "credit.")
# Keys a resume may change: how long a run goes on and how it reports, never what it learns from.
RESUMABLE = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.save_total_limit",
    "train.samples_per_log",
    "train.max_nonfinite_steps",
    "train.collapse_",
    "logging.",
    "device",
    "cache_dir",
    "resume",
    "run_dir",
    "world_size",  # a run is the same at any world size (docs/scaling.md)
    "update.gradient_checkpointing",
    "update.compile",
    "update.micro_batch_tokens",
    "rollout.kv_keep_gb",
)  # the last four: memory and speed, the same arithmetic


def save_overrides(run: Path, overrides: list[str]) -> None:
    (run / OVERRIDES_FILE).write_text(yaml.safe_dump(list(overrides)))


def run_dir_of(path: Path) -> Path | None:
    """The run directory holding `path` (a run, or one of its checkpoints/step_N), or None."""
    for cand in (path, path.parent.parent if path.parent.name == "checkpoints" else None):
        if cand is not None and (cand / "config.yaml").exists():
            return cand
    return None


def flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists stay values)."""
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: cfg}


def changes(before: DictConfig, after: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (before, after) for every leaf the two configs disagree on."""
    a = flat(OmegaConf.to_container(before, resolve=True))
    b = flat(OmegaConf.to_container(after, resolve=True))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _arg(overrides: list[str], key: str) -> str | None:
    """The last `key=value` on the command line (its value as typed), or None."""
    found = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith(f"{key}=")]
    return found[-1] if found else None


def _superseded(run_overrides: list[str], mine: list[str]) -> list[str]:
    """The run's overrides minus those under a group that `mine` chooses anew (task=builtin drops the
    run's task.sources... overrides, which the new task does not have)."""
    from rredcot.compose import groups, parse_overrides

    parsed = parse_overrides(mine)
    chosen = {o.key_or_group for o in parsed if o.key_or_group in groups(parsed)}
    return [
        ov
        for ov, o in zip(run_overrides, parse_overrides(run_overrides))
        if not any(o.key_or_group == g or o.key_or_group.startswith(g + ".") for g in chosen)
    ]


def _read_run(run: Path, resume: bool = False) -> tuple[DictConfig, list[str] | None]:
    try:
        saved = OmegaConf.load(run / "config.yaml")
        run_overrides = yaml.safe_load((run / OVERRIDES_FILE).read_text()) if (run / OVERRIDES_FILE).exists() else None
        if not isinstance(saved, DictConfig) or not isinstance(run_overrides, (list, type(None))):
            bad = "config.yaml" if not isinstance(saved, DictConfig) else OVERRIDES_FILE
            raise ValueError(f"{bad} does not hold the mapping / list rredcot writes")
    except Exception as e:
        fix = (
            f"Restore it: each checkpoint holds the config it was trained with (cp "
            f"{run}/checkpoints/step_N/{RUN_CONFIG} {run / 'config.yaml'}), then resume again"
            if resume
            else "Pass checkpoint= a checkpoint directory and the task's settings on the command line instead"
        )
        raise UserError(
            f"The run's config {str(run / 'config.yaml')!r} could not be read ({str(e).strip()[:200]}). {fix}."
        ) from None
    return saved, run_overrides


def _values(overrides: list[str], key: str) -> list[str]:
    """The list values the overrides give `key` (plugins=[a,b] -> [a, b])."""
    from rredcot.compose import normalize_overrides, parse_overrides

    out: list[str] = []
    for o in parse_overrides(normalize_overrides(list(overrides))):
        if o.key_or_group.lstrip("+") == key:
            v = o.value()
            out += [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
    return out


def refuse_code_from(run: Path, saved: DictConfig, run_overrides: list[str], mine: list[str]) -> None:
    """A run directory is data, never code: the plug-in modules, reward functions (verify.reward_funcs), pkg://
    config search paths and model.trust_remote_code it names are used only when `mine` (the user's own command
    line) names them too."""
    plugins = [str(p) for p in (saved.get("plugins") or [])] + _values(run_overrides, "plugins")
    theirs = [p for p in dict.fromkeys(plugins) if p not in _values(mine, "plugins")]
    rewards = [str(r) for r in ((saved.get("verify") or {}).get("reward_funcs") or [])]
    rewards += _values(run_overrides, "verify.reward_funcs")
    theirs_rewards = [r for r in dict.fromkeys(rewards) if r not in _values(mine, "verify.reward_funcs")]
    pkgs = [p for p in _values(run_overrides, "hydra.searchpath") if p.startswith("pkg://")]
    theirs_pkgs = [p for p in pkgs if p not in _values(mine, "hydra.searchpath")]
    mine_remote = _values(mine, "model.trust_remote_code")[-1:] == ["True"]  # the last one given wins
    remote = bool((saved.get("model") or {}).get("trust_remote_code", False)) and not mine_remote
    if not (theirs or theirs_rewards or theirs_pkgs or remote):
        return
    fix = []
    if theirs:
        fix.append(f"'plugins=[{','.join(dict.fromkeys(plugins))}]'")
    if theirs_rewards:
        fix.append(f"'verify.reward_funcs=[{','.join(dict.fromkeys(rewards))}]'")
    if theirs_pkgs:
        fix.append(f"'hydra.searchpath=[{','.join(pkgs)}]'")
    if remote:
        fix.append("model.trust_remote_code=true")
    named = [
        *theirs,
        *theirs_rewards,
        *theirs_pkgs,
        *(["the model's own code (model.trust_remote_code=true)"] if remote else []),
    ]
    raise UserError(
        f"The run in {str(run)!r} names code to run: {', '.join(named)}. rredcot never runs code because a run "
        "directory names it (a run someone shared could hold anything). If you trust it, name it on your own "
        f"command line: add {' '.join(fix)}; otherwise read the run with a command line of your own "
        "(checkpoint= a checkpoint directory, and the task's settings)."
    )


def _run_config(run: Path, mine: list[str], resume: bool = False) -> tuple[DictConfig, dict[str, tuple[Any, Any]]]:
    """(the run's saved config with what `mine` changes relative to the run's own command line applied,
    those changes). Keys today's code has and the run's config lacks (an older rredcot) take today's
    defaults for the run's command line. Nothing the run names is imported (refuse_code_from)."""
    from rredcot.compose import load_config

    saved, run_overrides = _read_run(run, resume)
    refuse_code_from(run, saved, run_overrides or [], mine)
    base = load_config(run_overrides or [], check_entries=False, import_plugins=False)
    changed = (
        changes(
            base,
            load_config([*_superseded(run_overrides or [], mine), *mine], check_entries=False, import_plugins=False),
        )
        if mine
        else {}
    )
    OmegaConf.set_struct(base, False)
    cfg = OmegaConf.merge(base, saved)
    for key, (_, new) in changed.items():
        OmegaConf.update(cfg, key, new, force_add=True)
    if mine and run_overrides is None:
        from rredcot.ui import note

        note(
            f"{run} has no {OVERRIDES_FILE} (made by an older rredcot): the overrides were applied as changes to "
            "the default config."
        )
    return cfg, changed


def said(changed: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())


def config_for_run(overrides: list[str], command: str) -> tuple[DictConfig, Path | None]:
    """The config a command that reads `checkpoint=RUN` should use: the run's saved config, changed only
    by what `overrides` change relative to the run's own command line (each change said in one line).
    Without a run directory (a bare model directory, or no checkpoint) it is the composed config."""
    from rredcot import registry
    from rredcot.checks import validate
    from rredcot.compose import load_config
    from rredcot.ui import note

    arg = _arg(overrides, "checkpoint")
    run = run_dir_of(Path(arg).expanduser()) if arg else None
    if run is None:
        cfg = load_config(overrides)
        if arg:
            note(
                f"{arg} is not inside a run directory (no config.yaml): {command} uses the task and settings of the "
                f"command line (task={cfg.task.name}, verify.name={cfg.verify.name})."
            )
        return cfg, None
    cfg, changed = _run_config(run, [o for o in overrides if not o.startswith("checkpoint=")])
    loud = {k: v for k, v in changed.items() if not k.startswith(_QUIET)}
    if loud:
        note(f"{command} on {run} with settings that differ from the run's config: {said(loud)}")
    OmegaConf.update(cfg, "checkpoint", arg, force_add=True)
    # Where the command writes: the directory the user named (run_dir=) or, by default, the run they passed,
    # never the run_dir its config.yaml recorded (a copied run would write into the original, a moved one
    # would re-create its old path).
    OmegaConf.update(cfg, "run_dir", _arg(overrides, "run_dir"), force_add=True)
    registry.load_plugins(cfg.get("plugins") or [])
    validate(cfg)
    return cfg, run


def config_for_resume(overrides: list[str]) -> DictConfig:
    """`rredcot train resume=true run_dir=RUN [overrides]`: the run's own saved config, so a plain resume
    continues the same run. Overrides may change only how long it runs, how it reports, and the memory and
    speed switches that leave its arithmetic alone (RESUMABLE; each said in one line); any other change
    is refused, naming the keys."""
    from rredcot import registry
    from rredcot.checks import validate
    from rredcot.compose import load_config
    from rredcot.ui import note

    asked = load_config(overrides, check_entries=False)
    if not asked.run_dir:
        raise UserError(
            "resume=true needs run_dir=PATH, the run directory to continue (e.g. "
            "rredcot train resume=true run_dir=runs/20261125_101500)."
        )
    run = Path(asked.run_dir).expanduser()
    if not (run / "config.yaml").exists():
        raise UserError(
            f"resume=true, but {str(run)!r} holds no run (no config.yaml). Point run_dir at a directory made "
            "by `rredcot train`, or drop resume=true to start a new run there."
        )
    cfg, changed = _run_config(run, overrides, resume=True)  # a hand-edited config.yaml: runlog.check_edits
    altering = {k: v for k, v in changed.items() if not k.startswith(RESUMABLE)}
    if altering:
        raise UserError(
            f"resume=true continues the run in {str(run)!r} with its own config, and these overrides would "
            f"change what it trains: {said(altering)}. Drop them to resume (only {', '.join(RESUMABLE)} "
            "may change), or start a new run with them (another run_dir)."
        )
    told = {k: v for k, v in changed.items() if not k.startswith(("resume", "run_dir"))}
    if told:
        note(f"resuming {run} with: {said(told)}.")
    if "train.steps" in told and (cfg.optim.schedule != "constant" or cfg.optim.warmup_ratio):
        note(
            f"optim.schedule={cfg.optim.schedule} (warmup_ratio={cfg.optim.warmup_ratio}) is stretched over the new "
            "train.steps from here on: the run is no longer the one a fresh start with these steps would make."
        )
    from rredcot.collectives import env_world_size

    if cfg.get("world_size") not in (None, env_world_size()):
        note(
            f"resuming on {env_world_size()} process(es); the run was started on {cfg.world_size}: the same run "
            "(sampling is keyed by step and prompt, not by process), config.yaml records the new count."
        )
    OmegaConf.update(cfg, "world_size", None, force_add=True)  # recorded, not chosen: the launch decides
    OmegaConf.update(cfg, "resume", True)
    OmegaConf.update(cfg, "run_dir", str(asked.run_dir))
    registry.load_plugins(cfg.get("plugins") or [])
    validate(cfg)
    return cfg


def unique_path(path: Path) -> Path:
    """`path` if it is free, else path with -2, -3, ... before the suffix: nothing is overwritten."""
    if not path.exists():
        return path
    n = 2
    while (cand := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    return cand
