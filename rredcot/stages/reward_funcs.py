"""Reward functions as TRL users write them: plain callables, called once per batch.

    def accuracy(prompts, completions, solution, **kwargs) -> list[float | None]: ...
    async def judge(prompts, completions, **kwargs) -> list[float | None]: ...   # awaited together

    verify.reward_funcs=[my_rewards.py:accuracy, my_pkg.rewards:judge]  verify.reward_weights=[1.0, 0.5]

The keyword arguments are TRL's (TRL 1.16.0, trl/trainer/grpo_trainer.py, GRPOTrainer._calculate_rewards):
`prompts` (the dataset's own prompt: a list of chat messages or a string), `completions` (for a
conversational prompt `[{"role": "assistant", "content": text}]`, else the text), `completion_ids`, every
other dataset column by name (one value per completion), `trainer_state` (here only `.global_step`), and
`log_extra` / `log_metric`, accepted and not logged. None (or NaN, which TRL cannot tell from None) means
undefined; how the rewards add up is stages/verify.py's `total`.

A module is imported only because the user's own command line names it: a run directory's config never
imports one (runconfig.refuse_code_from). Calls run in this process (no per-call timeout: a batch call is
not one completion's; verify.timeout_s holds the verifiers), every result held to the contract below.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from rredcot import registry
from rredcot.errors import UserError, brief
from rredcot.stages.guard import summary
from rredcot.types import Sample
from rredcot.ui import note

FIX = (
    "A reward function takes (prompts, completions, **columns) and returns one float, or None where the reward "
    "is undefined, per completion, as TRL's GRPOTrainer expects."
)


class RewardCallable:
    """One user reward function, its contract checked on every call: fn(**kwargs) -> N rewards as a tensor
    (NaN where undefined)."""

    def __init__(self, fn: Callable[..., Any], name: str, spec: str):
        self.fn, self.name, self.spec = fn, name, spec
        inner = _unwrap(fn)  # TRL 1.16's is_async_callable: a partial's function, or a callable object's __call__
        self.is_async = inspect.iscoroutinefunction(inner) or inspect.iscoroutinefunction(getattr(inner, "__call__"))

    def run(self, kwargs: dict[str, Any]) -> Any:
        """The function's result (a coroutine for an async one); an exception is a UserError naming it."""
        try:
            return self.fn(**kwargs)
        except UserError:
            raise
        except Exception as e:
            raise UserError(self._raised(e, kwargs)) from None

    def check(self, out: Any, n: int) -> torch.Tensor:
        """The N rewards `out` holds, or a UserError saying what the function returned instead."""
        values = out.tolist() if hasattr(out, "tolist") else out  # a tensor or a numpy array, as TRL takes them
        sized = isinstance(values, (list, tuple))
        if not sized or len(values) != n:
            got = f"{len(values)} values" if sized else brief(out, 60)
            raise UserError(
                f"The reward function {self.spec!r} returned {got} (a {type(out).__name__}) for {n} completions, "
                f"where a list of {n} rewards is expected. {FIX}"
            )
        for v in values:
            if v is not None and not (isinstance(v, numbers.Real) and (math.isfinite(v) or math.isnan(v))):
                raise UserError(
                    f"The reward function {self.spec!r} returned {brief(v, 60)} (a {type(v).__name__}) among its "
                    "rewards: a reward is a finite number, or None where it is undefined (an infinite one would make "
                    f"every advantage of its group NaN). {FIX}"
                )
        return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)

    def _raised(self, e: BaseException, kwargs: dict[str, Any]) -> str:
        if isinstance(e, TypeError) and "argument" in str(e):  # a column it names that the data lacks
            return (
                f"The reward function {self.spec!r} cannot be called with what the data gives it: {summary(e)}. It "
                f"is called with the keyword arguments {', '.join(kwargs)} (the dataset's columns among them). "
                "Rename its parameter to one of these, or take the rest as **kwargs."
            )
        return (
            f"The reward function {self.spec!r} raised: {summary(e)}. It runs on whatever the model writes, so "
            f"it must not raise on odd text: return 0.0 for a completion it cannot read, None where a reward is "
            f"undefined. {FIX}"
        )


def _unwrap(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def load_reward_func(spec: str) -> RewardCallable:
    """`module:function` or `path/to/file.py:function` -> the callable (UserErrors name the spec and the fix)."""
    module_spec, sep, attr = str(spec).rpartition(":")
    if not sep or not module_spec or not attr:
        raise UserError(
            f"verify.reward_funcs entry {spec!r} is not MODULE:FUNCTION. Name the module (importable from the "
            "working directory or PYTHONPATH, or a .py path) and the function, e.g. "
            "'verify.reward_funcs=[my_rewards.py:accuracy_reward]'."
        )
    if (module_spec.endswith(".py") or os.sep in module_spec) and not Path(module_spec).expanduser().is_file():
        raise UserError(
            f"verify.reward_funcs entry {spec!r}: there is no file {module_spec!r}. Give the path of an existing .py "
            "file, or a module name importable from the working directory or PYTHONPATH."
        )
    module = registry.import_module(module_spec, "The reward-function module", reuse=True)  # once per process
    fn = getattr(module, attr, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))[:8]
        raise UserError(
            f"verify.reward_funcs entry {spec!r}: {module_spec} has no function {attr!r} (its functions: "
            f"{', '.join(found) or 'none'}). Name one of them after the colon."
        )
    inner = _unwrap(fn)  # the metrics name, as TRL 1.16's get_callable_name gives it
    return RewardCallable(fn, getattr(inner, "__name__", type(inner).__name__), str(spec))


def build_callables(cfg: Any, taken: set[str]) -> dict[str, tuple[RewardCallable, float]]:
    """verify.reward_funcs with verify.reward_weights (default: 1 each), keyed by the name the metrics use
    (the function's __name__; its full spec where that name is taken)."""
    specs = list(cfg.get("reward_funcs") or [])
    weights = cfg.get("reward_weights")
    weights = [1.0] * len(specs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(specs):
        raise UserError(
            f"verify.reward_weights has {len(weights)} weight(s) for {len(specs)} verify.reward_funcs: give one "
            "weight per function, in the same order, or leave verify.reward_weights=null (1 each)."
        )
    out: dict[str, tuple[RewardCallable, float]] = {}
    for spec, w in zip(specs, weights):
        fn = load_reward_func(spec)
        name = fn.name if fn.name not in taken | set(out) else fn.spec
        out[name] = (fn, w)
    return out


def _conversational(prompt: Any) -> bool:
    """TRL's is_conversational: a list whose first item is a mapping with a role."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


_told: set[str] = set()


def _log_stub(kind: str) -> Callable[..., None]:
    def log(*args: Any, **kwargs: Any) -> None:
        if kind not in _told:
            _told.add(kind)
            note(f"a reward function called {kind}: rredcot accepts it and does not log what it passes (yet).")

    return log


def call_kwargs(texts: list[str], samples: list[Sample], ids: list[list[int]] | None, step: int) -> dict[str, Any]:
    """The keyword arguments TRL gives a reward function, for these completions."""
    prompts = [s.meta.get("prompt", s.prompt) for s in samples]
    completions = [[{"role": "assistant", "content": t}] if _conversational(p) else t for p, t in zip(prompts, texts)]
    columns: dict[str, list[Any]] = {}
    for i, s in enumerate(samples):  # the task's columns; a task that keeps none gives its gold as `solution`
        for k, v in (s.meta.get("columns") or {"solution": s.gold}).items():
            columns.setdefault(k, [None] * len(samples))[i] = v
    return {
        **columns,
        "prompts": prompts,
        "completions": completions,
        "completion_ids": ids if ids is not None else [[] for _ in texts],
        "trainer_state": SimpleNamespace(global_step=step),
        "log_extra": _log_stub("log_extra"),
        "log_metric": _log_stub("log_metric"),
    }


_loop: asyncio.AbstractEventLoop | None = None


def _event_loop() -> asyncio.AbstractEventLoop:
    """One loop per process for every call, as TRL keeps one: an async client bound to it keeps working."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop


def run_callables(
    funcs: dict[str, tuple[RewardCallable, float]], texts: list[str], samples: list[Sample], ids: Any, step: int
) -> dict[str, torch.Tensor]:
    """name -> [N] rewards (NaN where undefined): the sync functions in order, then the async ones together."""
    if not funcs or not texts:
        return {name: torch.full((len(texts),), math.nan) for name in funcs}
    kwargs = call_kwargs(texts, samples, ids, step)
    out = {name: fn.check(fn.run(kwargs), len(texts)) for name, (fn, _) in funcs.items() if not fn.is_async}
    pending = [(name, fn) for name, (fn, _) in funcs.items() if fn.is_async]
    if pending:

        async def gather() -> list[Any]:
            return await asyncio.gather(*(fn.run(kwargs) for _, fn in pending), return_exceptions=True)

        for (name, fn), res in zip(pending, _event_loop().run_until_complete(gather())):
            if isinstance(res, Exception):
                raise UserError(fn._raised(res, kwargs)) from None
            out[name] = fn.check(res, len(texts))
    return {name: out[name] for name in funcs}


def try_callables(funcs: dict[str, tuple[RewardCallable, float]], samples: list[Sample]) -> None:
    """Each function once at start-up, on an empty completion and the gold of a few rows (trainer_state.global_step
    0): one that breaks its contract or wants a column the data lacks is refused before any run file is written."""
    pairs = [(text, s) for s in samples for text in ("", s.gold)]
    run_callables(funcs, [t for t, _ in pairs], [s for _, s in pairs], None, 0)


def completion_id_lists(ro: Any) -> list[list[int]]:
    """Each completion's token ids up to and including its EOS (TRL's completion_ids)."""
    return [row[mask.bool()].tolist() for row, mask in zip(ro.completion_ids.cpu(), ro.completion_mask.cpu())]


def only_callables_note(cfg: Any) -> str | None:
    """The start-up line when callables are the whole reward: what still reads the verifier."""
    v = cfg.verify
    if not v.get("reward_funcs") or v.weight or v.format_weight:
        return None
    names = ", ".join(str(s).rpartition(":")[2] for s in v.reward_funcs)
    est = cfg.redistribute.name
    uses = (
        f"credit is uniform (redistribute={est}), so no estimator reads it"
        if est == "uniform"
        else f"the value estimators (redistribute={est}) find and judge answers with it"
    )
    return (
        f"the reward is verify.reward_funcs alone ({names}; verify.weight=0): the {v.name} verifier (verify.name) "
        f"still decides `accuracy` and the held-out evaluation, and {uses}."
    )
