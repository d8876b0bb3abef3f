"""Finished run directories read for a comparison: a Run (config, metrics, eval.json), the view of one held-out
split, and the grouping of runs into methods (runs that differ in any training setting are told apart,
never averaged as seeds of one method). The report built from them: rredcot/compare_report.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rredcot import registry
from rredcot.errors import UserError
from rredcot.runconfig import RESUMABLE, flat
from rredcot.runlog import eval_prefix, read_metrics


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    result: dict[str, Any]

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    split: str = ""  # the held-out split whose metrics this view reads (load_run)
    label: str = ""  # set by group_runs: the estimator, plus the settings that tell same-estimator runs apart

    @property
    def estimator(self) -> str:
        """The name the registry gives the run's estimator (uniform credit is GRPO); a plug-in's that this
        process has not loaded keeps its own name."""
        name = self.config["redistribute"]["name"]
        return registry.entry("redistribute", name).title if name in registry.names("redistribute") else name

    def method_settings(self) -> dict[str, Any]:
        """Every setting that shapes training (flattened), so runs that differ in any of them (optim.lr,
        train.critic_lag, ...) are never averaged together as seeds of one method."""
        return {k: v for k, v in flat(self.config).items() if not k.startswith(NOT_METHOD)}


# Settings that do not change what a run learns: those a resume may change (runconfig.RESUMABLE) but the
# run's length, plus the seed, what is evaluated and where things come from.
NOT_METHOD = tuple(k for k in RESUMABLE if k != "train.steps") + (
    "seed",
    "checkpoint",
    "plugins",
    "eval.",
    "credit.",
    "verify.timeout_s",
    "verify.budget_s",
)


def load_run(path: Path, split: str | None = None) -> Run:
    """A finished run (seen through `split`, see split_view), or a UserError that says what is missing."""
    if not path.is_dir():
        raise UserError(f"Run directory {str(path)!r} does not exist. Pass directories made by `rredcot train`.")
    missing = [f for f in ("config.yaml", "metrics.jsonl", "eval.json") if not (path / f).exists()]
    if missing:
        raise UserError(
            f"Run {str(path)!r} is incomplete (no {', '.join(missing)}): it has not finished. "
            "Finish it with `rredcot train resume=true run_dir=...`, or leave it out."
        )
    try:
        run = Run(
            path,
            yaml.safe_load((path / "config.yaml").read_text()),
            read_metrics(path),
            json.loads((path / "eval.json").read_text()),
        )
        run.seed, run.config["eval"]["split"], run.config["redistribute"]["name"]  # noqa: B018 (what reports read)
        float(run.result["final"]["accuracy"])
    except Exception as e:  # a malformed run is a message, never a traceback
        what = f"missing {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        raise UserError(
            f"Run {str(path)!r} is malformed ({what}): its config.yaml, metrics.jsonl and eval.json are not "
            "what `rredcot train` writes (was eval.json edited or replaced?). Leave it out, or retrain it."
        ) from None
    return split_view(run, split or run.config["eval"]["split"])


def split_view(run: Run, split: str) -> Run:
    """The run as if `split` were its eval split: its eval_<split>/... metrics become eval/..., and
    eval.json's splits[split] its start/final (a run chosen on dev can be reported on test)."""
    primary = run.config["eval"]["split"]
    if split == primary:
        run.split = split
        return run
    if split not in run.result.get("splits", {}):
        extra = run.config["eval"].get("extra_splits") or []
        raise UserError(
            f"Run {str(run.path)!r} was not evaluated on the {split!r} split (its eval.split is {primary!r}, "
            f"eval.extra_splits {list(extra)}). Train with eval.extra_splits=[{split}], or leave --split out."
        )
    prefix = eval_prefix(split, primary) + "/"
    metrics = [
        {
            **{k: v for k, v in row.items() if not k.startswith("eval/")},
            **{"eval/" + k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)},
        }
        for row in run.metrics
    ]
    return Run(run.path, run.config, metrics, {**run.result, **run.result["splits"][split]}, split=split)


def _task_key(run: Run) -> dict[str, Any]:
    """The task settings that define the problems (the forcing texts are the estimator's, not the task's)."""
    return {k: v for k, v in run.config["task"].items() if k not in ("forcing_text", "closing_text")}


def _tells_apart(key: str, differ: list[str], settings: list[dict[str, Any]]) -> bool:
    """When runs differ in e.g. segment.name, the other segment.* options differ with it (each segmenter has
    its own): name them only if they also differ between runs of one segmenter."""
    name = key.split(".")[0] + ".name"
    if key == name or name not in differ:
        return True
    seen: dict[Any, set[str]] = {}
    for c in settings:
        seen.setdefault(c.get(name), set()).add(repr(c.get(key)))
    return any(len(v) > 1 for v in seen.values())


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by method label; all must be of the same task."""
    task = runs[0].config["task"]
    for r in runs[1:]:
        if _task_key(r) != _task_key(runs[0]):
            raise UserError(
                f"Run {str(r.path)!r} is of a different task than {str(runs[0].path)!r} "
                f"({r.config['task'].get('name')} vs {task.get('name')}, or other task settings). "
                "Compare runs of one task only."
            )
    splits = sorted({r.split for r in runs})
    if len(splits) > 1:
        raise UserError(
            f"The runs were evaluated on different splits ({', '.join(splits)}). Choose one with --split "
            "(every run must have it as eval.split or in eval.extra_splits)."
        )
    by_estimator: dict[str, list[Run]] = {}
    for r in runs:
        by_estimator.setdefault(r.estimator, []).append(r)
    for name, rs in by_estimator.items():  # e.g. "rredcot redistribute.mode=mixed" vs "... mode=return_to_go"
        settings = [r.method_settings() for r in rs]
        # a key only some runs have (added by a later rredcot, its default kept) tells runs apart only by its values
        differ = sorted({k for c in settings for k in c if any(k in o and o[k] != c[k] for o in settings)})
        differ = [k for k in differ if _tells_apart(k, differ, settings)]
        for r, c in zip(rs, settings):
            r.label = name + "".join(f" {k}={c.get(k)}" for k in differ)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    _one_run_per_seed(groups)
    if len(groups) < 2:
        raise UserError(f"All runs are of one method ({next(iter(groups))}); compare needs a method and a baseline.")
    return groups


def distinct_dirs(paths: list[Path]) -> None:
    """Each run directory once: `--runs W W G G` would count one run as two seeds, and a paired test over
    copies reports a certainty the runs do not have."""
    seen: dict[Path, str] = {}
    for p in paths:
        key = Path(p).expanduser().resolve()
        if key in seen:
            twice = f"{str(p)!r} twice" if seen[key] == str(p) else f"{seen[key]!r} and {str(p)!r}, both {str(key)!r}"
            raise UserError(
                f"compare --runs names one run directory twice ({twice}): it would count as two seeds, and the "
                "test over seeds would be over copies of one run. Pass each run directory once."
            )
        seen[key] = str(p)


def _one_run_per_seed(groups: dict[str, list[Run]]) -> None:
    """Two runs of one method with one seed are one seed twice (a copied run directory, or a rerun): refused."""
    for label, runs in groups.items():
        by_seed: dict[int, list[str]] = {}
        for r in runs:
            by_seed.setdefault(r.seed, []).append(str(r.path))
        twice = {seed: paths for seed, paths in by_seed.items() if len(paths) > 1}
        if twice:
            seed, paths = next(iter(twice.items()))
            raise UserError(
                f"Runs {' and '.join(map(repr, paths))} are both {label} with seed {seed}: compare pairs seeds "
                "and would count one seed twice. Pass one run per method and seed (train another seed with "
                "seed=N for more)."
            )
