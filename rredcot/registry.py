"""One small registry per stage: configs pick entries by short public names.

    @register("segment", "fixed")
    def fixed(trace, *, size=16): ...

    get("segment", "fixed")      # -> the function
    get("segment", "fixd")       # -> UserError listing the valid names

The pipeline only ever calls `get(stage, cfg.name)`; it never branches on names.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

from rredcot.errors import UserError

STAGES = ("task", "rollout", "verify", "segment", "redistribute", "update")
_REGISTRY: dict[str, dict[str, Any]] = {stage: {} for stage in STAGES}


def register(stage: str, name: str) -> Callable[[Any], Any]:
    """Decorator: file `obj` under `stage` as `name`. A duplicate name raises at import time."""
    if stage not in _REGISTRY:
        raise KeyError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")

    def deco(obj: Any) -> Any:
        if name in _REGISTRY[stage]:
            raise KeyError(f"{stage} entry {name!r} is registered twice")
        _REGISTRY[stage][name] = obj
        return obj

    return deco


def _load_all() -> None:
    # Importing the stage modules runs their @register decorators.
    import rredcot.stages.redistribute  # noqa: F401
    import rredcot.stages.rollout  # noqa: F401
    import rredcot.stages.segment  # noqa: F401
    import rredcot.stages.update  # noqa: F401
    import rredcot.stages.verify  # noqa: F401
    import rredcot.task.datasets  # noqa: F401


def names(stage: str) -> list[str]:
    """Sorted public names registered under `stage`."""
    _load_all()
    if stage not in _REGISTRY:
        raise UserError(f"There is no stage {stage!r}. Stages are: {', '.join(STAGES)}.")
    return sorted(_REGISTRY[stage])


def get(stage: str, name: str, key: str | None = None) -> Any:
    """The entry `name` of `stage`; an unknown name is a UserError that lists the valid ones.

    `key` is the config key that chose it (for the message), default `<stage>.name`.
    """
    valid = names(stage)
    if name not in _REGISTRY[stage]:
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"Unknown {stage} {name!r}.{hint} Valid {stage} names are: {', '.join(valid)}. "
            f"Set {key or stage + '.name'} to one of these (`rredcot list` shows every registry)."
        )
    return _REGISTRY[stage][name]
