"""One small registry per stage: configs pick entries by short public names.

    @register("segment", "fixed")
    def fixed(trace, *, size=16): ...

    get("segment", "fixed")      # -> the function
    get("segment", "fixd")       # -> UserError listing the valid names

The pipeline only ever calls `get(stage, cfg.name)`; it never branches on names.

Built-in names are listed in `BUILTIN` (stage -> name -> the module that registers it), so `rredcot
list` and config checks answer without importing torch; `get` imports the module on first use, and a
test checks that the modules register exactly these names. Plug-ins add entries from outside the
package: modules named in the config key `plugins` (`load_plugins`) and installed packages that
declare the entry-point group `rredcot.plugins`; both are imported before any registry is read.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from rredcot.errors import UserError

STAGES = ("task", "rollout", "verify", "segment", "redistribute", "update")
ENTRY_POINT_GROUP = "rredcot.plugins"
_S = "rredcot.stages."
BUILTIN: dict[str, dict[str, str]] = {
    "task": {"builtin": "rredcot.task.datasets", "hf": "rredcot.task.datasets", "search": "rredcot.task.search"},
    "rollout": {"sample": _S + "rollout", "vllm": _S + "vllm_backend"},
    "verify": {n: _S + "verify" for n in ("builtin", "gsm8k", "math", "format")},
    "segment": {n: _S + "segment" for n in ("none", "fixed", "newline", "keyword", "entropy", "hybrid")},
    "redistribute": {n: _S + "redistribute" for n in ("uniform", "rredcot", "verdict", "mc", "attention", "gradient")},
    "update": {n: _S + "update" for n in ("grpo", "bnpo", "dr_grpo", "dapo")},
}
_REGISTRY: dict[str, dict[str, Any]] = {stage: {} for stage in STAGES}
_loaded_plugins: set[str] = set()
_entry_points_loaded = False


def register(stage: str, name: str, rules: dict | None = None) -> Callable[[Any], Any]:
    """Decorator: file `obj` under `stage` as `name`. A duplicate name raises at import time.

    `rules`: option name -> rredcot.ranges.Rule, the valid range of each of its config options (checked
    at config time, before any work). An entry may also carry `check_options(section, prefix)` for
    checks across several options."""
    if stage not in _REGISTRY:
        raise KeyError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")

    def deco(obj: Any) -> Any:
        if name in _REGISTRY[stage] or (name in BUILTIN[stage] and not obj.__module__.startswith("rredcot.")):
            raise KeyError(f"{stage} entry {name!r} is registered twice (a plug-in must choose a new name)")
        _REGISTRY[stage][name] = obj
        if rules:
            obj.option_rules = dict(rules)
        return obj

    return deco


def _import_plugin(spec: str) -> None:
    """A dotted module name (found on sys.path or in the working directory) or a path to a .py file."""
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"Plug-in file {spec!r} does not exist. `plugins` takes module names (importable from "
                            "the working directory or PYTHONPATH) or paths to .py files.")
        module_spec = importlib.util.spec_from_file_location(f"rredcot_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
        return
    if os.getcwd() not in sys.path:  # `python -m` has it, the `rredcot` console script does not
        sys.path.append(os.getcwd())
    importlib.import_module(spec)


def load_plugins(specs: Iterable[str]) -> None:
    """Import each plug-in once (its @register calls fill the registries); errors name the plug-in."""
    for spec in specs or ():
        spec = str(spec)
        if spec in _loaded_plugins:
            continue
        try:
            _import_plugin(spec)
        except UserError:
            raise
        except ModuleNotFoundError as e:
            raise UserError(f"Plug-in {spec!r} could not be imported: {e}. Put its directory on PYTHONPATH, run from "
                            "the directory that holds it, or give the path of the .py file.") from None
        except Exception as e:
            raise UserError(f"Plug-in {spec!r} failed while importing: {type(e).__name__}: {e}") from None
        _loaded_plugins.add(spec)


def _load_entry_points() -> None:
    """Installed packages' plug-ins: `[project.entry-points."rredcot.plugins"] name = "module"`."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:
            raise UserError(f"The installed plug-in {ep.name!r} ({ep.value}, entry point group {ENTRY_POINT_GROUP}) "
                            f"failed to import: {type(e).__name__}: {e}. Fix or uninstall it.") from None


def names(stage: str) -> list[str]:
    """Sorted public names registered under `stage` (built-in and plug-in), without importing built-ins."""
    if stage not in _REGISTRY:
        raise UserError(f"There is no stage {stage!r}. Stages are: {', '.join(STAGES)}.")
    _load_entry_points()
    return sorted(set(BUILTIN[stage]) | set(_REGISTRY[stage]))


def check(stage: str, name: str, key: str | None = None) -> None:
    """A UserError listing the valid names (and the closest) when `name` is not an entry of `stage`.

    `key` is the config key that chose it (for the message), default `<stage>.name`."""
    valid = names(stage)
    if name not in valid:
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"Unknown {stage} {name!r}.{hint} Valid {stage} names are: {', '.join(valid)}. "
            f"Set {key or stage + '.name'} to one of these (`rredcot list` shows every registry; "
            "your own entries come in through `plugins`)."
        )


def get(stage: str, name: str, key: str | None = None) -> Any:
    """The entry `name` of `stage` (imported on first use); an unknown name is a UserError (see `check`)."""
    check(stage, name, key)
    if name not in _REGISTRY[stage]:
        importlib.import_module(BUILTIN[stage][name])  # runs its @register decorators
    return _REGISTRY[stage][name]


def check_options(stage: str, name: str, options: Any, prefix: str, keywords: bool = True) -> None:
    """The options a config gives entry `name` (its section minus `name`) are ones it takes, in range.

    keywords: the entry receives them as keyword arguments (segmenters, estimators, rollouts), so a
    name it does not take is an error listing the ones it does."""
    import inspect

    from rredcot import ranges

    entry = get(stage, name)
    if keywords and callable(entry) and not isinstance(entry, type):
        params = inspect.signature(entry).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            takes = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY or p.default is not p.empty]
            for key in options:
                if key not in params:
                    raise UserError(f"{prefix}{key} is not an option of {stage} {name!r}; it takes: {', '.join(takes)}. "
                                    f"Remove it, or choose the {stage} that has it.")
    ranges.check(options, getattr(entry, "option_rules", {}), prefix)
    extra = getattr(entry, "check_options", None)
    if extra is not None:
        extra(options, prefix)
