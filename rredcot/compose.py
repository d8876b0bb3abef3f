"""Compose the Hydra config (compose API, configs shipped in rredcot/conf) from a command line.

Every failure here is a UserError: one paragraph naming the problem and the fix (exit status 2).
Checked while composing, before Hydra sees the overrides: unknown keys (with the closest valid ones),
a new key without `+`, wrong value types (against the defaults' types), unknown group options. What
the composed values must satisfy (ranges, registry names, batch arithmetic) is rredcot/checks.py,
which `load_config` runs last.
"""

from __future__ import annotations

import difflib
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from rredcot import registry
from rredcot.checks import validate
from rredcot.errors import UserError, brief
from rredcot.ranges import RULES

CONFIG_NAME = "train"
OPEN_MAPPINGS = ("verify.options",)  # mappings whose keys are the user's (a verifier's arguments)


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
                    pkg = entry[len("pkg://") :].replace("/", ".")
                    try:
                        dirs.append(Path(str(resources.files(pkg))))
                    except ModuleNotFoundError:
                        raise UserError(
                            f"hydra.searchpath names {entry!r}, but package {pkg!r} is not importable."
                        ) from None
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

    parser = OverridesParser.create()
    try:
        return parser.parse_overrides(overrides)
    except Exception as e:
        bad = next((ov for ov in overrides if not _parses(parser, ov)), None)
        if bad is not None and not bad.isascii():
            raise UserError(non_ascii_message(bad)) from None
        raise UserError(
            f"Could not parse the overrides: {brief(bad or overrides, 80)}: {str(e).splitlines()[0]} "
            "Write them as key=value (e.g. rollout.temperature=0.8), +key=value to add a key."
        ) from None


def _parses(parser: Any, override: str) -> bool:
    try:
        parser.parse_overrides([override])
        return True
    except Exception:
        return False


def non_ascii_message(override: str) -> str:
    """Hydra's grammar reads non-ASCII characters only inside quotes, and never in a key."""
    key, sep, value = override.partition("=")
    odd = next(ch for ch in override if not ch.isascii())
    if not key.isascii():
        folded = unicodedata.normalize("NFKD", key.lstrip("+~")).encode("ascii", "ignore").decode()
        close = difflib.get_close_matches(folded, _flat_keys(OmegaConf.load(config_dir() / f"{CONFIG_NAME}.yaml")))
        hint = f" Did you mean {close[0]}?" if close else ""
        return (
            f"{brief(override)}: the key {key!r} has the non-ASCII character {odd!r} (U+{ord(odd):04X}); config keys "
            f"are ASCII letters, digits, '_' and '-'.{hint} `rredcot config show` prints every valid key."
        )
    return (
        f"{brief(override)}: the value has the non-ASCII character {odd!r} (U+{ord(odd):04X}), which the "
        f"override grammar reads only inside quotes. Quote the value: '{key}{sep}\"{value}\"' (the outer "
        "single quotes are for the shell, the inner double quotes for rredcot)."
    )


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
        raise UserError(
            f"The config does not compose: {msg} Run `rredcot config show` to see the valid keys, "
            "and `rredcot list` for the config groups and their options."
        ) from None


def _check_override_keys(parsed: list[Any], reference: DictConfig) -> None:
    """Unknown keys, a new key without `+`, a new group without `+`, checked before Hydra sees them."""
    grp = groups(parsed)
    known = _flat_keys(reference)
    for o in parsed:
        key = o.key_or_group
        if o.is_delete():
            _check_delete(key, grp, reference)
        if o.is_add() or o.is_force_add() or o.is_delete() or key.startswith("hydra."):
            continue
        if key in grp:
            if key not in _defaults_groups():
                raise UserError(
                    f"'{key}' is a config group that is in no defaults list, so it is added with a plus: "
                    f"write +{key}={o.value()} (options: {', '.join(grp[key])})."
                )
            continue
        if OmegaConf.select(reference, key, default="__missing__") == "__missing__":
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise UserError(
                f"Unknown config key '{key}'.{hint} If you mean to add a new key, write +{key}=... "
                f"(`rredcot config show` prints every valid key)."
            )


def _check_delete(key: str, grp: dict[str, list[str]], reference: DictConfig) -> None:
    """`~key` may drop a preset group (exp, debug, algo: they make no section of their own), a verifier argument
    or an option of a group's config (a task's forcing_text: what needs it says so). A key of train.yaml itself
    or an entry's name is read by the code wherever it runs, so deleting one would crash the run there."""
    if key.startswith("hydra.") or any(key.startswith(m + ".") for m in OPEN_MAPPINGS):
        return
    if key not in grp and not key.endswith(".name") and key not in _base_keys():
        return
    if key in grp:
        if key in reference:
            raise UserError(
                f"~{key} removes the {key} config, which every run needs. Choose another one with {key}=NAME "
                f"(options: {', '.join(grp[key])}), or leave the override out for the default."
            )
        return
    default = OmegaConf.select(reference, key, default="__missing__")
    if default == "__missing__":
        return  # Hydra's own error names a key that is not there
    setting = f"empty it with '{key}={{}}'" if isinstance(default, DictConfig) else f"set it: {key}=VALUE"
    raise UserError(
        f"~{key} deletes a key the code reads in every run, so the run would crash where it is first needed. "
        f"Leave the override out to keep its default, or {setting}."
    )


def _base_keys() -> set[str]:
    """The keys train.yaml defines for every run (its defaults list aside)."""
    base = OmegaConf.load(config_dir() / f"{CONFIG_NAME}.yaml")
    return {k for k in _flat_keys(base) if k != "defaults"}


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
        if (key.endswith(".name") or key == "update.loss_type") and got in ("number", "int", "bool"):
            raise UserError(  # a registry entry named nan, inf, true or 1e3: the grammar reads a number or a bool
                f"{key}={o.value()} is read as a {got}, not a name. Quote it: '{key}=\"{o.value()}\"' (the outer "
                "single quotes are for the shell)."
            )
        if want in ("null", "str") or got == "null" or want == got or (want, got) == ("number", "int"):
            continue
        rule = RULES.get(key)
        if (want, got) == ("int", "number") and rule is not None and not rule.integral:
            continue  # an int default of a key whose range is a number (verify.timeout_s: 10, 0.5 is fine)
        article = "an" if want[0] in "aeiou" else "a"
        raise UserError(
            f"{key}={brief(o.value())} has the wrong type: expected {want} (the default is "
            f"{OmegaConf.select(reference, key)!r}). Give {article} {want} value, "
            f"e.g. {key}={OmegaConf.select(reference, key)}."
        )


def normalize_overrides(overrides: list[str]) -> list[str]:
    """`+exp=gsm8k` -> `exp=gsm8k` (exp is in the defaults list, so both spellings mean the same), and
    only `hydra.searchpath` among Hydra's own keys (the rest configure Hydra's app runner, which we do not use)."""
    out = []
    for ov, o in zip(overrides, parse_overrides(overrides)):
        key = o.key_or_group
        if key.startswith("hydra.") and key != "hydra.searchpath":
            raise UserError(
                f"{ov}: rredcot reads only hydra.searchpath among Hydra's keys (to add config directories, "
                "e.g. 'hydra.searchpath=[file:///path/to/conf]'). Use run_dir=PATH for where a run goes."
            )
        if o.is_add() and not o.is_force_add() and key in _defaults_groups():
            ov = ov[1:]
        if key in OPEN_MAPPINGS and not (o.is_add() or o.is_force_add() or o.is_delete()):
            ov = "++" + ov  # replace the whole mapping, whatever keys it had
        out.append(ov)
    return out


def load_config(
    overrides: list[str] | None = None, check_entries: bool = True, import_plugins: bool = True
) -> DictConfig:
    """Compose `train.yaml` with Hydra overrides, import plug-ins, then check keys, types and consistency.

    check_entries=False skips the checks that import stage modules (torch): `config show` stays fast.
    import_plugins=False: compose only (a run directory's command line, before the user agreed to its code)."""
    overrides = normalize_overrides(list(overrides or []))
    parsed = parse_overrides(overrides)
    grp = groups(parsed)
    # The reference: the same group choices and search path, no value overrides. It gives valid keys and types.
    group_only = [
        ov
        for ov, o in zip(overrides, parsed)
        if o.key_or_group == "hydra.searchpath"
        or (o.key_or_group in grp and (o.key_or_group in _defaults_groups() or o.is_add()))
    ]
    reference = _compose(group_only)
    _check_override_keys(parsed, reference)
    cfg = _compose(overrides)
    _check_types(parsed, cfg, reference)
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:
        raise UserError(f"A value in the config could not be resolved: {' '.join(str(e).split())}") from None
    if not import_plugins:  # the caller validates once the code it agreed to is imported (runconfig)
        return cfg
    registry.load_plugins(cfg.get("plugins") or [])  # before any registry is read
    validate(cfg, check_entries)
    return cfg
