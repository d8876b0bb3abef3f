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
OPEN_MAPPINGS = ("verify.options",)  # mappings whose keys are the user's (a verifier's arguments)
ENTRY_KEYS = [("rollout", "rollout.name"), ("verify", "verify.name"), ("segment", "segment.name"),
              ("redistribute", "redistribute.name"), ("update", "update.loss_type"), ("task", "task.name")]


def config_dir() -> Path:
    """The shipped configs: rredcot/conf in an install (mapped from the repo's top-level conf/)."""
    source = Path(__file__).resolve().parent.parent / "conf"  # a source checkout (also editable installs)
    if (source / f"{CONFIG_NAME}.yaml").exists():
        return source
    return Path(str(resources.files("rredcot.conf")))


def searchpath_dirs(parsed: list[Any] = ()) -> list[Path]:
    """Config directories a `hydra.searchpath=[file://DIR, pkg://PKG]` override adds (after ours)."""
    dirs = []
    for o in parsed:
        if o.key_or_group == "hydra.searchpath":
            for entry in o.value() or []:
                entry = str(entry)
                if entry.startswith("pkg://"):
                    pkg = entry[len("pkg://"):].replace("/", ".")
                    try:
                        dirs.append(Path(str(resources.files(pkg))))
                    except ModuleNotFoundError:
                        raise UserError(f"hydra.searchpath names {entry!r}, but package {pkg!r} is not importable.") from None
                else:
                    dirs.append(Path(entry.removeprefix("file://")).expanduser())
    return dirs


NOT_GROUPS = {"accelerate"}  # conf/accelerate/: launcher configs (accelerate launch --config_file), not Hydra's


def groups(parsed: list[Any] = ()) -> dict[str, list[str]]:
    """Config group -> its options, e.g. {"algo": ["grpo"], "exp": ["gsm8k", ...]}, over our configs
    and any directories added with hydra.searchpath."""
    out: dict[str, set[str]] = {}
    for root in [config_dir(), *searchpath_dirs(parsed)]:
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if d.is_dir() and not d.name.startswith(("_", ".")) and d.name not in NOT_GROUPS:
                out.setdefault(d.name, set()).update(p.stem for p in d.glob("*.yaml"))
    return {g: sorted(opts) for g, opts in sorted(out.items())}


def _defaults_groups() -> set[str]:
    """Groups named in train.yaml's defaults list (chosen with group=option; +group=option is the same)."""
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


def parse_overrides(overrides: list[str]) -> list[Any]:
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
    """Unknown keys, a new key without `+`, a new group without `+`, checked before Hydra sees them."""
    grp = groups(parsed)
    known = _flat_keys(reference)
    for o in parsed:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or key.startswith("hydra."):
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
    grp = groups(parsed)
    for o in parsed:
        key = o.key_or_group
        if key in grp or o.is_add() or o.is_force_add() or o.is_delete() or key.startswith("hydra."):
            continue
        want, got = _kind(OmegaConf.select(reference, key)), _kind(OmegaConf.select(cfg, key))
        if want in ("null", "str") or got == "null" or want == got or (want, got) == ("number", "int"):
            continue
        raise UserError(f"{key}={o.value()!s} has the wrong type: expected {want} (the default is "
                        f"{OmegaConf.select(reference, key)!r}). Give a {want} value, e.g. {key}={OmegaConf.select(reference, key)}.")


def normalize_overrides(overrides: list[str]) -> list[str]:
    """`+exp=gsm8k` -> `exp=gsm8k` (exp is in the defaults list, so both spellings mean the same), and
    only `hydra.searchpath` among Hydra's own keys (the rest configure Hydra's app runner, which we do not use)."""
    out = []
    for ov, o in zip(overrides, parse_overrides(overrides)):
        key = o.key_or_group
        if key.startswith("hydra.") and key != "hydra.searchpath":
            raise UserError(f"{ov}: rredcot reads only hydra.searchpath among Hydra's keys (to add config directories, "
                            "e.g. 'hydra.searchpath=[file:///path/to/conf]'). Use run_dir=PATH for where a run goes.")
        if o.is_add() and not o.is_force_add() and key in _defaults_groups():
            ov = ov[1:]
        if key in OPEN_MAPPINGS and not (o.is_add() or o.is_force_add() or o.is_delete()):
            ov = "++" + ov  # replace the whole mapping, whatever keys it had
        out.append(ov)
    return out


def load_config(overrides: list[str] | None = None, check_entries: bool = True) -> DictConfig:
    """Compose `train.yaml` with Hydra overrides, import plug-ins, then check keys, types and consistency.

    check_entries=False skips the checks that import stage modules (torch): `config show` stays fast."""
    overrides = normalize_overrides(list(overrides or []))
    parsed = parse_overrides(overrides)
    grp = groups(parsed)
    # The reference: the same group choices and search path, no value overrides. It gives valid keys and types.
    group_only = [ov for ov, o in zip(overrides, parsed) if o.key_or_group == "hydra.searchpath" or
                  (o.key_or_group in grp and (o.key_or_group in _defaults_groups() or o.is_add()))]
    reference = _compose(group_only)
    _check_override_keys(parsed, reference)
    cfg = _compose(overrides)
    _check_types(parsed, cfg, reference)
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:
        raise UserError(f"A value in the config could not be resolved: {' '.join(str(e).split())}") from None
    from rredcot import registry

    registry.load_plugins(cfg.get("plugins") or [])  # before any registry is read
    validate(cfg, check_entries)
    return cfg


def validate(cfg: DictConfig, check_entries: bool = True) -> None:
    """Ranges and batch arithmetic; registry names (unknown ones list the valid names) and each entry's options."""
    from rredcot import ranges, registry

    if cfg.verify.name is None:
        raise UserError(f"The task {cfg.task.name!r} names no verifier: add `verifier: NAME` to its config (the answer "
                        "checker that scores it, e.g. builtin, gsm8k, math or a plug-in's), or set verify.name=NAME.")

    g, n = cfg.rollout.group_size, cfg.train.generation_batch_size
    if g < 2:
        raise UserError(f"rollout.group_size={g}: GRPO compares completions of one prompt, so a group needs at least 2. "
                        "Set rollout.group_size=2 or more (8 is typical).")
    ranges.check(cfg, ranges.RULES)
    if n % g:
        raise UserError(f"train.generation_batch_size={n} is not a whole number of groups of rollout.group_size={g}. "
                        f"Make it a multiple of {g}, e.g. train.generation_batch_size={max(g, n - n % g)}.")
    spg, micro = cfg["update"].steps_per_generation, cfg["update"].micro_batch_size
    if spg < 1 or n % spg or (n // spg) % micro:
        raise UserError(f"Each generation batch of {n} completions is split into update.steps_per_generation={spg} "
                        f"optimizer steps of micro-batches of update.micro_batch_size={micro}; {n} / {spg} must be a whole "
                        f"multiple of {micro}. Change update.micro_batch_size (a divisor of {n // max(spg, 1)}) or steps_per_generation.")
    check_data_parallel(cfg)
    if max(cfg.eval.ks) > cfg.eval.n_samples:
        raise UserError(f"eval.ks={list(cfg.eval.ks)} asks for pass@{max(cfg.eval.ks)}, but eval.n_samples={cfg.eval.n_samples} "
                        f"completions are sampled per prompt: set eval.n_samples={max(cfg.eval.ks)} or drop the larger k.")
    if cfg.credit.against not in (None, "mc"):
        raise UserError(f"credit.against={cfg.credit.against!r}: the only reference is mc (credit.against=mc), or null for none.")
    for split in [cfg.eval.split, *cfg.eval.extra_splits]:
        if split not in ("dev", "test"):
            raise UserError(f"eval.split / eval.extra_splits name {split!r}: held-out splits are dev and test (train is "
                            "for training). Choose settings with eval.split=dev and keep test for the final numbers, "
                            "e.g. eval.split=dev eval.extra_splits=[test].")
    for stage, key in ENTRY_KEYS:
        registry.check(stage, OmegaConf.select(cfg, key), key)
    for entry in cfg.credit.estimators:
        registry.check("redistribute", estimator_spec(entry)[0], "credit.estimators")
    for name in cfg.credit.segmenters:
        registry.check("segment", name, "credit.segmenters")
    if check_entries:
        _check_entries(cfg)


def check_data_parallel(cfg: DictConfig, world: int | None = None) -> None:
    """Under W processes each rank owns whole prompt groups: W must divide the prompts per step, and each
    rank's share of an optimizer step must be whole micro-batches (micro_batch_size is per process)."""
    from rredcot.distributed import env_world_size

    w = world or env_world_size()
    g, n = cfg.rollout.group_size, cfg.train.generation_batch_size
    spg, micro = cfg["update"].steps_per_generation, cfg["update"].micro_batch_size
    if w == 1:
        return
    prompts = n // g
    if prompts % w:
        fits = [k for k in range(1, prompts + 1) if prompts % k == 0]
        raise UserError(f"{w} processes share each step's {prompts} prompts (train.generation_batch_size={n} / rollout."
                        f"group_size={g}), and every process must own whole prompt groups. Make the prompts per step a "
                        f"multiple of {w} (train.generation_batch_size={g * w * max(1, round(prompts / w))}), or launch a "
                        f"number of processes that divides {prompts} ({', '.join(map(str, fits))}).")
    local = n // w // spg
    if local % micro:
        raise UserError(f"On {w} processes each one's share of an optimizer step is {n} / {w} / update.steps_per_generation="
                        f"{spg} = {local} completions, not a whole number of micro-batches of update.micro_batch_size={micro} "
                        f"(a per-process size). Set update.micro_batch_size to a divisor of {local} (e.g. {_divisor(local, micro)}).")


def _divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _check_entries(cfg: DictConfig) -> None:
    """Each chosen entry's own options (imports the stage modules, so torch): names it takes, ranges."""
    from rredcot import registry
    from rredcot.stages.verify import build_reward_funcs

    registry.check_options("rollout", cfg.rollout.name, rollout_options(cfg.rollout)[1], "rollout.")
    for stage in ("segment", "redistribute"):
        registry.check_options(stage, cfg[stage].name, stage_options(cfg[stage]), f"{stage}.")
    registry.check_options("task", cfg.task.name, _without_name(cfg.task), "task.", keywords=False)
    for entry in cfg.credit.estimators:  # a variant's options: names the estimator takes, values in range
        name, opts = estimator_spec(entry)
        registry.check_options("redistribute", name, opts, f"credit.estimators {entry!r}: ")
    build_reward_funcs(cfg.verify)  # a verifier checks its own options when it is built
    for stage, key in ENTRY_KEYS:
        entry = registry.get(stage, OmegaConf.select(cfg, key), key)
        for need in getattr(entry, "needs_task_keys", ()):  # e.g. answer forcing needs task.forcing_text
            if cfg.task.get(need) is None:
                raise UserError(f"{key}={OmegaConf.select(cfg, key)} needs task.{need}, which this task's config does not set. "
                                f"Add it to the task config (see conf/task/*.yaml for examples) or pass +task.{need}=..., "
                                "or choose another estimator (e.g. algo=grpo).")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("device=cuda, but torch sees no CUDA GPU here (a CPU-only torch build, or no driver). "
                            "Use device=auto (a GPU when there is one) or device=cpu.")


def _without_name(section: DictConfig) -> DictConfig:
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(section, resolve=True).items() if k != "name"})


def estimator_spec(entry: str) -> tuple[str, dict[str, Any]]:
    """A credit.estimators entry: "rredcot" or a variant "rredcot:self_normalize=true,include_reference=false"
    -> (name, options over its shipped config). Values are YAML: true, 0.5, [a, b], [["so x=", "\\n"]]
    (commas inside brackets or quotes belong to the value)."""
    import yaml

    name, _, rest = str(entry).partition(":")
    opts = {}
    for part in _top_level_split(rest):
        key, eq, value = part.partition("=")
        if not eq:
            raise UserError(f"credit.estimators entry {entry!r}: write options as name:key=value,key=value "
                            "(e.g. rredcot:self_normalize=true).")
        try:
            opts[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"credit.estimators entry {entry!r}: the value of {key.strip()} is not valid YAML "
                            f"({str(e).splitlines()[0]}). Quote strings, e.g. extra_forcings=[['so x=', '\\n']].") from None
    return name.strip(), opts


def _top_level_split(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: 'a=1,b=[1,2],c="x,y"' -> ['a=1', 'b=[1,2]', 'c="x,y"']."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return [p for p in [*parts, cur] if p.strip()]


SAMPLING_KEYS = ("group_size", "max_new_tokens", "temperature", "top_p", "top_k")  # rollout.*: how, for every backend


def rollout_options(section: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """rollout.* split into (sampling settings every backend honours, the chosen backend's own options)."""
    opts = stage_options(section)
    return {k: opts.pop(k) for k in SAMPLING_KEYS if k in opts}, opts


def stage_options(section: DictConfig) -> dict[str, Any]:
    """A stage section minus its `name`: the keyword arguments of the registry entry."""
    opts = OmegaConf.to_container(section, resolve=True)
    opts.pop("name", None)
    return opts
