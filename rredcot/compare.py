"""Training for `rredcot compare`: the configured method and a baseline, same overrides, same seeds.

Each run is a `rredcot train` subprocess (its own process, so one run's memory never leaks into the
next); an overall progress bar shows which method and seed is training.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rredcot import registry
from rredcot.compose import groups, load_config
from rredcot.errors import UserError
from rredcot.ui import make_progress


def baseline_override(baseline: str) -> str:
    """`grpo` -> algo=grpo (a preset); a redistributor name -> redistribute=<name>."""
    if baseline in groups()["algo"]:
        return f"algo={baseline}"
    if baseline in registry.names("redistribute"):
        return f"redistribute={baseline}"
    raise UserError(
        f"Unknown baseline {baseline!r}. Use an algorithm preset ({', '.join(groups()['algo'])}) "
        f"or a redistributor ({', '.join(registry.names('redistribute'))})."
    )


def train_command(overrides: list[str], seed: int, run: Path) -> list[str]:
    """`python -m rredcot train` for one seed into `run`, quiet (the caller shows progress)."""
    return [
        sys.executable,
        "-m",
        "rredcot",
        "train",
        *overrides,
        f"seed={seed}",
        f"run_dir={run}",
        "logging.progress=false",
    ]


def method_label(overrides: list[str]) -> str:
    """The name the registry gives the run's estimator in reports (uniform credit is GRPO)."""
    return registry.entry("redistribute", load_config(overrides).redistribute.name).title


def train_pair(overrides: list[str], baseline: str, seeds: int, out: Path, console) -> list[Path]:
    """Train both methods for seeds 0..seeds-1 into out/<label>/seed<N>; returns the run directories.

    The baseline drops the method's own segment./redistribute. overrides (they describe the method).
    """
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: at least one seed is needed (5 or more for a meaningful test).")
    base_over = [o for o in overrides if not o.lstrip("+~").startswith(("segment", "redistribute", "algo"))]
    base_over.append(baseline_override(baseline))
    plans = [(method_label(overrides), overrides), (method_label(base_over), base_over)]
    if plans[0][0] == plans[1][0]:
        raise UserError(f"The method and the baseline are the same ({plans[0][0]}); choose another --baseline.")
    dirs = []
    with make_progress() as progress:
        bar = progress.add_task("compare", total=2 * seeds)
        for seed in range(seeds):
            for label, over in plans:
                run = out / label / f"seed{seed}"
                progress.update(bar, description=f"training {label}, seed {seed + 1}/{seeds}")
                proc = subprocess.run(train_command(over, seed, run), capture_output=True, text=True)
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                    raise UserError(
                        f"Training {label} seed {seed} failed (exit {proc.returncode}); its last lines: "
                        + " | ".join(tail)
                        + f" The runs so far are in {out}."
                    )
                dirs.append(run)
                progress.advance(bar)
    return dirs
