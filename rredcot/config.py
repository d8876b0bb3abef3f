"""Compose the Hydra config (compose API, configs shipped in rredcot/conf) and check it.

Every failure here is a UserError: one paragraph naming the problem and the fix (exit status 2).
Checks: unknown keys (with the closest valid ones), a new key without `+`, wrong value types
(against the defaults' types), unknown group options, registry names, and batch arithmetic.
"""
from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from rredcot.errors import UserError

CONFIG_NAME = "train"


def config_dir() -> Path:
    """The shipped configs: rredcot/conf in an install (mapped from the repo's top-level conf/)."""
    source = Path(__file__).resolve().parent.parent / "conf"  # a source checkout (also editable installs)
    if (source / f"{CONFIG_NAME}.yaml").exists():
        return source
    return Path(str(resources.files("rredcot.conf")))


def groups() -> dict[str, list[str]]:
    """Config group -> its options, e.g. {"algo": ["grpo"], "exp": ["gsm8k", ...]}."""
    root = config_dir()
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith("_")}


def _defaults_groups() -> set[str]:
    """Groups named in train.yaml's defaults list (chosen with group=option, no plus)."""
    entries = OmegaConf.load(config_dir() / f"{CONFIG_NAME}.yaml").get("defaults", [])
    return {k for e in entries if isinstance(e, DictConfig) for k in e.keys()}


def _flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            path = f"{prefix}{k}"
            keys.append(path)
            keys.extend(_flat_keys(cfg._get_node(k), path + "."))
    return keys


def _parse(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise UserError(f"Could not parse the overrides {overrides}: {str(e).splitlines()[0]} "
                        "Write them as key=value (e.g. rollout.temperature=0.8), +key=value to add a key.") from None


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(CONFIG_NAME, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        msg = " ".join(str(e).split())
        cause = e.__cause__
        if cause is not None:
            msg += " " + " ".join(str(cause).split())
        raise UserError(f"The config does not compose: {msg} Run `rredcot config show` to see the valid keys, "
                        "and `rredcot list` for the config groups and their options.") from None


def _check_override_keys(parsed: list[Any], reference: DictConfig) -> None:
    """Unknown keys, a new key without `+`, and `exp=` without `+`, checked before Hydra sees them."""
    grp = groups()
    known = _flat_keys(reference)
    for o in parsed:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete():
            continue
        if key in grp:
            if key not in _defaults_groups():
                raise UserError(f"'{key}' is a config group that is in no defaults list, so it is added with a plus: "
                                f"write +{key}={o.value()} (options: {', '.join(grp[key])}).")
            continue
        if OmegaConf.select(reference, key, default="__missing__") == "__missing__":
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise UserError(f"Unknown config key '{key}'.{hint} If you mean to add a new key, write +{key}=... "
                            f"(`rredcot config show` prints every valid key).")


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number" if isinstance(v, float) else "int"
    if isinstance(v, (list, ListConfig)):
        return "list"
    if isinstance(v, (dict, DictConfig)):
        return "mapping"
    return "str" if isinstance(v, str) else "null"


def _check_types(parsed: list[Any], cfg: DictConfig, reference: DictConfig) -> None:
    """A value override must keep its default's type (an int where a float was is fine)."""
    grp = groups()
    for o in parsed:
        key = o.key_or_group
        if key in grp or o.is_add() or o.is_force_add() or o.is_delete():
            continue
        want, got = _kind(OmegaConf.select(reference, key)), _kind(OmegaConf.select(cfg, key))
        if want in ("null", "str") or got == "null" or want == got or (want, got) == ("number", "int"):
            continue
        raise UserError(f"{key}={o.value()!s} has the wrong type: expected {want} (the default is "
                        f"{OmegaConf.select(reference, key)!r}). Give a {want} value, e.g. {key}={OmegaConf.select(reference, key)}.")


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose `train.yaml` with Hydra overrides, then check keys, types and consistency."""
    overrides = list(overrides or [])
    parsed = _parse(overrides)
    grp = groups()
    # The reference: the same group choices, no value overrides. It gives valid keys and types.
    group_only = [ov for ov, o in zip(overrides, parsed) if o.key_or_group in grp and (o.key_or_group in _defaults_groups() or o.is_add())]
    reference = _compose(group_only)
    _check_override_keys(parsed, reference)
    cfg = _compose(overrides)
    _check_types(parsed, cfg, reference)
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:
        raise UserError(f"A value in the config could not be resolved: {' '.join(str(e).split())}") from None
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Ranges and batch arithmetic; registry names (unknown ones list the valid names)."""
    from rredcot import registry

    g, n = cfg.rollout.group_size, cfg.train.generation_batch_size
    if g < 2:
        raise UserError(f"rollout.group_size={g}: GRPO compares completions of one prompt, so a group needs at least 2. "
                        "Set rollout.group_size=2 or more (8 is typical).")
    if n % g:
        raise UserError(f"train.generation_batch_size={n} is not a whole number of groups of rollout.group_size={g}. "
                        f"Make it a multiple of {g}, e.g. train.generation_batch_size={max(g, n - n % g)}.")
    spg, micro = cfg["update"].steps_per_generation, cfg["update"].micro_batch_size
    if spg < 1 or n % spg or (n // spg) % micro:
        raise UserError(f"Each generation batch of {n} completions is split into update.steps_per_generation={spg} "
                        f"optimizer steps of micro-batches of update.micro_batch_size={micro}; {n} / {spg} must be a whole "
                        f"multiple of {micro}. Change update.micro_batch_size (a divisor of {n // max(spg, 1)}) or steps_per_generation.")
    checks = [("rollout.temperature", cfg.rollout.temperature > 0), ("rollout.max_new_tokens", cfg.rollout.max_new_tokens > 0),
              ("update.num_iterations", cfg["update"].num_iterations >= 1), ("train.steps", cfg.train.steps >= 0),
              ("rollout.top_p", 0 < cfg.rollout.top_p <= 1), ("update.beta", cfg["update"].beta >= 0),
              ("eval.n_samples", cfg.eval.n_samples >= max(cfg.eval.ks))]
    for key, ok in checks:
        if not ok:
            raise UserError(f"{key}={OmegaConf.select(cfg, key)} is out of range. See the comment beside it in conf/train.yaml "
                            "(`rredcot config show` prints the current values); eval.n_samples must be at least max(eval.ks).")
    for split in [cfg.eval.split, *cfg.eval.extra_splits]:
        if split not in ("dev", "test"):
            raise UserError(f"eval.split / eval.extra_splits name {split!r}: held-out splits are dev and test (train is "
                            "for training). Choose settings with eval.split=dev and keep test for the final numbers, "
                            "e.g. eval.split=dev eval.extra_splits=[test].")
    for stage, key in [("rollout", "rollout.name"), ("verify", "verify.name"), ("segment", "segment.name"),
                       ("redistribute", "redistribute.name"), ("update", "update.loss_type"), ("task", "task.name")]:
        entry = registry.get(stage, OmegaConf.select(cfg, key), key)
        for need in getattr(entry, "needs_task_keys", ()):  # e.g. answer forcing needs task.forcing_text
            if cfg.task.get(need) is None:
                raise UserError(f"{key}={OmegaConf.select(cfg, key)} needs task.{need}, which this task's config does not set. "
                                f"Add it to the task config (see conf/task/*.yaml for examples) or pass +task.{need}=..., "
                                "or choose another estimator (e.g. algo=grpo).")


def stage_options(section: DictConfig) -> dict[str, Any]:
    """A stage section minus its `name`: the keyword arguments of the registry entry."""
    opts = OmegaConf.to_container(section, resolve=True)
    opts.pop("name", None)
    return opts
