"""One small registry per stage: configs pick entries by short public names.

    @register("segment", "fixed", rules={"size": COUNT})
    def fixed(trace, *, size=16): ...

    get("segment", "fixed")      # -> the function
    entry("segment", "fixed")    # -> Entry: the function and what it declared (rules, needs, ...)
    get("segment", "fixd")       # -> UserError listing the valid names

The trainer only ever calls `get(stage, cfg.name)`; it never branches on names.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from rredcot.errors import UserError

STAGES = ("task", "rollout", "verify", "segment", "redistribute", "loss")
ENTRY_POINT_GROUP = "rredcot.plugins"
_S = "rredcot.stages."
BUILTIN: dict[str, dict[str, str]] = {
    "task": {"builtin": "rredcot.task.builtin", "hf": "rredcot.task.hub", "search": "rredcot.task.search"},
    "rollout": {"sample": _S + "rollout", "vllm": _S + "vllm_backend"},
    "verify": {n: _S + "verify" for n in ("builtin", "gsm8k", "math", "format")},
    "segment": {n: _S + "segment" for n in ("none", "fixed", "newline", "keyword", "entropy", "hybrid")},
    "redistribute": {
        n: _S + "redistribute"
        for n in ("uniform", "rredcot", "reference", "vps", "verdict", "mc", "attention", "gradient")
    },
    "loss": {n: "rredcot.losses" for n in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo", "cispo", "vespo")},
}


@dataclass(frozen=True)
class Entry:
    """One registered thing and the contract it declared at registration (nothing is read off the object later).

    Fields a stage does not use keep their defaults."""

    stage: str
    name: str
    obj: Any  # the function or class the config selects
    rules: Mapping[str, Any] = field(default_factory=dict)  # option -> rredcot.ranges.Rule, checked at config time
    check: Callable[[Any, str], None] | None = None  # (options, key prefix) -> None: checks across several options
    needs_task_keys: tuple[str, ...] = ()  # task.* keys it reads (e.g. answer forcing: forcing_text)
    runs_backward: bool = False  # redistribute: a backward pass per trace (not under FSDP2 / ZeRO-3)
    reads_kv: bool = False  # redistribute: its probes read the traces' keys and values (the sampler keeps its KV cache)
    warmstart: Callable[[Any, Any], list] | None = None  # task: (cfg, tokenizer) -> warm-start samples
    divide_by_accum: bool = True  # loss: the trainer divides it by the accumulation steps (False: global denominator)
    surrogate: str = "clip"  # loss: the per-token term it aggregates (rredcot/surrogates.py, SURROGATES)
    label: str | None = None  # the name reports give it (uniform credit is GRPO); default: its name

    @property
    def title(self) -> str:
        return self.label or self.name


_REGISTRY: dict[str, dict[str, Entry]] = {stage: {} for stage in STAGES}
RENAMED = {"update": "loss"}  # old stage name -> new
# attributes the registry used to read off registered functions -> the register() field that replaced each
LEGACY = {
    "option_rules": "rules",
    "check_options": "check",
    "needs_task_keys": "needs_task_keys",
    "runs_backward": "runs_backward",
    "warmstart_samples": "warmstart",
    "divide_by_accum": "divide_by_accum",
}
_loaded_plugins: set[str] = set()
_entry_points_loaded = False


def register(stage: str, name: str, rules: Mapping[str, Any] | None = None, **contract: Any) -> Callable[[Any], Any]:
    """Decorator: file `obj` under `stage` as `name`, with what it declares (the fields of `Entry`:
    `rules`, option name -> rredcot.ranges.Rule, checked at config time before any work; `check`,
    needs_task_keys, runs_backward, reads_kv, warmstart, divide_by_accum, surrogate, label). A duplicate name raises at
    import time; so does a contract field that Entry does not have."""
    if stage not in _REGISTRY:
        hint = f" (the loss aggregations are stage {RENAMED[stage]!r} now)" if stage in RENAMED else ""
        raise KeyError(f"unknown stage {stage!r}{hint}; stages are {', '.join(STAGES)}")
    unknown = set(contract) - set(Entry.__dataclass_fields__)
    if unknown:
        raise TypeError(f"register({stage!r}, {name!r}): unknown contract field(s) {sorted(unknown)}")

    def deco(obj: Any) -> Any:
        if name in _REGISTRY[stage] or (name in BUILTIN[stage] and not obj.__module__.startswith("rredcot.")):
            raise KeyError(f"{stage} entry {name!r} is registered twice (a plug-in must choose a new name)")
        _REGISTRY[stage][name] = Entry(stage, name, obj, dict(rules or {}), **contract)
        return obj

    return deco


def _import_plugin(spec: str, reuse: bool = False) -> Any:
    """A dotted module name (found on sys.path or in the working directory) or a path to a .py file: the module.
    A file is executed anew unless `reuse` (then a module already made from that file is taken)."""
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise UserError(
                f"Plug-in file {spec!r} does not exist. `plugins` takes module names (importable from "
                "the working directory or PYTHONPATH) or paths to .py files."
            )
        name = f"rredcot_plugin_{path.stem}"
        if reuse and getattr(sys.modules.get(name), "__file__", None) == str(path):  # a plug-in and reward_funcs both
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:  # `python -m` has it, the `rredcot` console script does not
        sys.path.append(os.getcwd())
    return importlib.import_module(spec)


def load_plugins(specs: Iterable[str]) -> None:
    """Import each plug-in once (its @register calls fill the registries); errors name the plug-in."""
    for spec in specs or ():
        spec = str(spec)
        if spec not in _loaded_plugins:
            import_module(spec, "Plug-in")
            _loaded_plugins.add(spec)


def import_module(spec: str, what: str, reuse: bool = False) -> Any:
    """The module `spec` names (a dotted name or a .py path); an import failure is a UserError naming `what`."""
    try:
        return _import_plugin(spec, reuse)
    except UserError:
        raise
    except ModuleNotFoundError as e:
        raise UserError(
            f"{what} {spec!r} could not be imported: {e}. Put its directory on PYTHONPATH, run from "
            "the directory that holds it, or give the path of the .py file."
        ) from None
    except Exception as e:
        raise UserError(f"{what} {spec!r} failed while importing: {type(e).__name__}: {e}") from None


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
            raise UserError(
                f"The installed plug-in {ep.name!r} ({ep.value}, entry point group {ENTRY_POINT_GROUP}) "
                f"failed to import: {type(e).__name__}: {e}. Fix or uninstall it."
            ) from None


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


def entry(stage: str, name: str, key: str | None = None) -> Entry:
    """The Entry `name` of `stage` (imported on first use); an unknown name is a UserError (see `check`)."""
    check(stage, name, key)
    if name not in _REGISTRY[stage]:
        importlib.import_module(BUILTIN[stage][name])  # runs its @register decorators
    found = _REGISTRY[stage][name]
    stuck = sorted(LEGACY.keys() & set(getattr(found.obj, "__dict__", {})))
    if stuck:  # a plug-in written for the old registry: its contract would be silently ignored
        raise UserError(
            f"The {stage} entry {name!r} sets {', '.join(stuck)} on the function after registering it; "
            f"declare it in the registration instead, e.g. @register({stage!r}, {name!r}, "
            f"{LEGACY[stuck[0]]}=...)."
        )
    return found


def get(stage: str, name: str, key: str | None = None) -> Any:
    """The function or class registered as `name` of `stage` (see `entry` for its declared contract)."""
    return entry(stage, name, key).obj


def check_options(stage: str, name: str, options: Any, prefix: str, keywords: bool = True) -> None:
    """The options a config gives entry `name` (its section minus `name`) are ones it takes, in range.

    keywords: the entry receives them as keyword arguments (segmenters, estimators, rollouts), so a
    name it does not take is an error listing the ones it does."""
    import inspect

    from rredcot import ranges

    e = entry(stage, name)
    if keywords and callable(e.obj) and not isinstance(e.obj, type):
        params = inspect.signature(e.obj).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            takes = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY or p.default is not p.empty]
            for key in options:
                if key not in params:
                    raise UserError(
                        f"{prefix}{key} is not an option of {stage} {name!r}; it takes: {', '.join(takes)}. "
                        f"Remove it, or choose the {stage} that has it."
                    )
    ranges.check(options, e.rules, prefix)
    if e.check is not None:
        e.check(options, prefix)
