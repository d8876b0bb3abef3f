"""Training for `rredcot compare`: the configured method and a baseline, same overrides, same seeds.

Each run is a `rredcot train` subprocess (its own process, so one run's memory never leaks into the
next); an overall progress bar shows which method and seed is training. A compare stopped with Ctrl-C
continues when the same command runs again with the same --out: finished seeds are kept, the stopped
one resumes from its checkpoint.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rredcot import registry
from rredcot.compose import groups, load_config
from rredcot.errors import UserError
from rredcot.runconfig import RESUMABLE
from rredcot.runlock import LOCK_FILE
from rredcot.stopping import STOP_FILE, install, restore
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


def train_overrides(overrides: list[str], seed: int, run: Path) -> list[str]:
    """What `rredcot train` is given for one seed into `run`, quiet (the caller shows progress)."""
    return [*overrides, f"seed={seed}", f"run_dir={run}", "logging.progress=false"]


def train_command(overrides: list[str], seed: int, run: Path) -> list[str]:
    """`python -m rredcot train` for one seed into `run`, quiet (the caller shows progress)."""
    return [sys.executable, "-m", "rredcot", "train", *train_overrides(overrides, seed, run)]


def method_label(overrides: list[str]) -> str:
    """The name the registry gives the run's estimator in reports (uniform credit is GRPO)."""
    return registry.entry("redistribute", load_config(overrides).redistribute.name).title


@dataclass
class Planned:
    """One seed of one method, and what an earlier compare into the same --out left of it (run_state)."""

    label: str
    overrides: list[str]
    seed: int
    run: Path
    state: str = "new"  # new | finished | resume | restart


def plan(overrides: list[str], baseline: str, seeds: int, out: Path) -> list[Planned]:
    """Both methods for seeds 0..seeds-1 into out/<label>/seed<N>, seed by seed. The baseline drops the
    method's own segment./redistribute./algo overrides (they describe the method)."""
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: at least one seed is needed (5 or more for a meaningful test).")
    base_over = [o for o in overrides if not o.lstrip("+~").startswith(("segment", "redistribute", "algo"))]
    base_over.append(baseline_override(baseline))
    methods = [(method_label(overrides), overrides), (method_label(base_over), base_over)]
    if methods[0][0] == methods[1][0]:
        raise UserError(f"The method and the baseline are the same ({methods[0][0]}); choose another --baseline.")
    return [Planned(label, over, s, out / label / f"seed{s}") for s in range(seeds) for label, over in methods]


def train_pair(overrides: list[str], baseline: str, seeds: int, out: Path, console) -> list[Path]:
    """Train both methods for seeds 0..seeds-1 into out/<label>/seed<N> (continuing what an earlier compare
    into `out` left); returns the run directories."""
    from rredcot.compare_report import check_report_dir

    runs = plan(overrides, baseline, seeds, out)
    check_report_dir(out)  # a report file of the user's in --out is found before hours of training
    for p in runs:
        p.state = run_state(p, out)
    if any(p.state != "new" for p in runs):
        console.print(said_states(out, runs), soft_wrap=True)
    with make_progress() as progress, Forward(console) as stop:
        bar = progress.add_task("compare", total=len(runs))
        for p in runs:
            if stop.count:  # Ctrl-C between two trains: the next one never starts
                break
            if p.state != "finished":
                progress.update(bar, description=f"training {p.label}, seed {p.seed + 1}/{seeds}")
                _train(p, out, stop)
            progress.advance(bar)
    if stop.count:
        console.print(
            f"[yellow]compare stopped. To continue, run the same command with --out {out}: finished seeds are "
            "kept, a stopped one resumes from its checkpoint."
        )
        raise KeyboardInterrupt
    return [p.run for p in runs]


def _train(p: Planned, out: Path, stop: Forward) -> None:
    if p.state == "restart":  # run_state checked it holds only what train wrote before its first checkpoint
        shutil.rmtree(p.run)
    cmd = train_command(p.overrides, p.seed, p.run)
    if p.state == "resume":  # with the run's own config (run_state checked that it is this command's)
        cmd = [sys.executable, "-m", "rredcot", "train", "resume=true", f"run_dir={p.run}"]
    proc = stop.run(cmd, f"{p.label} seed {p.seed}")
    if proc.returncode != 0 and not stop.count:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise UserError(
            f"Training {p.label} seed {p.seed} failed (exit {proc.returncode}); its last lines: "
            + " | ".join(tail)
            + f" The runs so far are in {out}; once the cause is fixed, the same command with --out {out} "
            "continues them (finished seeds are kept)."
        )


# ---- what an earlier compare into the same --out left ---------------------------------------------------

# What `rredcot train` writes in a run directory before its first checkpoint: a run that stopped then holds
# nothing else, and is cleared and started again (anything else there is not train's, and is never removed).
BEFORE_FIRST_CHECKPOINT = {"config.yaml", "overrides.yaml", "metrics.jsonl", "eval_start.json", "samples"}
BEFORE_FIRST_CHECKPOINT |= {"checkpoints", "tensorboard", "wandb", LOCK_FILE, STOP_FILE}
# Keys a resume may change (where it runs, how it reports: not what it learns), but train.steps: they may differ.
NOT_SETTINGS = tuple(k for k in RESUMABLE if k != "train.steps")


def run_state(p: Planned, out: Path) -> str:
    """new (nothing there), finished (eval.json: kept), resume (a checkpoint, no eval.json) or restart (stopped
    before its first checkpoint); a UserError where continuing would change or remove something it should not."""
    run = p.run
    if run.exists() and not run.is_dir():
        raise UserError(f"{str(run)!r} is a file, where compare puts {p.label} seed {p.seed}. Choose another --out.")
    names = {q.name for q in run.iterdir()} if run.is_dir() else set()
    if names <= {LOCK_FILE}:
        return "new"
    if "config.yaml" in names:
        from rredcot.runlog import checkpoints  # torch: not for `from rredcot.compare import train_command`

        _same_settings(p, out)
        if "eval.json" in names:
            return "finished"
        if checkpoints(run):
            _not_running(run, out)
            return "resume"
    stray = _strays(run, names)
    if stray:
        raise UserError(
            f"{str(run)!r}, where compare puts {p.label} seed {p.seed}, holds {', '.join(stray)}, which `rredcot "
            "train` does not write there, and no checkpoint to resume from; compare restarts such a run only when "
            "removing it loses nothing (nothing was changed). Move those files away, or choose another --out."
        )
    _not_running(run, out)
    return "restart"


def _strays(run: Path, names: set[str]) -> list[str]:
    """What `run` holds beyond what train writes before its first checkpoint (a half-written step_N.tmp is):
    without config.yaml, train wrote nothing but its lock (and a STOP file may have been touched)."""
    if "config.yaml" not in names:
        return sorted(names - {LOCK_FILE, STOP_FILE})
    stray = sorted(names - BEFORE_FIRST_CHECKPOINT)
    for sub, ours in (
        ("samples", lambda q: q.name.startswith("step_") and q.suffix == ".jsonl"),
        ("checkpoints", lambda q: q.name.endswith(".tmp")),
    ):
        if (run / sub).is_dir():
            stray += [f"{sub}/{q.name}" for q in sorted((run / sub).iterdir()) if not ours(q)]
    return stray


def _same_settings(p: Planned, out: Path) -> None:
    """The run in p.run was trained with exactly the config this compare would train it with."""
    from omegaconf import OmegaConf

    from rredcot.runconfig import changes, said

    try:
        saved = OmegaConf.load(p.run / "config.yaml")
    except Exception as e:  # a damaged file is a message naming it
        raise UserError(
            f"{str(p.run / 'config.yaml')!r} does not parse ({type(e).__name__}), so compare cannot tell whether "
            f"{p.run} is its own {p.label} seed {p.seed}. Restore the file, or choose another --out."
        ) from None
    diff = changes(saved, load_config(train_overrides(p.overrides, p.seed, p.run)))
    diff = {k: v for k, v in diff.items() if not k.startswith(NOT_SETTINGS)}
    if diff:
        shown = said(dict(list(diff.items())[:4])) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise UserError(
            f"--out {out} holds an earlier compare whose {p.label} seed {p.seed} ({p.run}) was trained with other "
            f"settings (earlier -> now: {shown}). A compare continues only with the overrides it started with "
            "(nothing was changed): for the new ones choose another --out; to continue the earlier one, rerun it "
            "with its own overrides."
        )


def _not_running(run: Path, out: Path) -> None:
    """No `rredcot train` writes `run` now (another compare into the same --out): its lock is free."""
    from rredcot.runlock import RunLock

    lock = RunLock(run)
    try:
        lock.acquire()
    except UserError as e:
        raise UserError(
            f"{e} (compare would continue this run: wait for the other one to end, or choose another --out.)"
        ) from None
    lock.release()


def said_states(out: Path, runs: list[Planned]) -> str:
    """One start-up line: what is kept, resumed and restarted of the compare in `out`."""
    what = {
        "finished": "keeping {} (finished)",
        "resume": "resuming {}",
        "restart": "restarting {} (stopped before its first checkpoint)",
    }
    parts = []
    for state, text in what.items():
        these = [p for p in runs if p.state == state]
        if these:
            names = ", ".join(f"{p.label} seed {p.seed}" + _from(p) for p in these)
            parts.append(text.format(names))
    new = sum(p.state == "new" for p in runs)
    return f"continuing the compare in {out}: " + "; ".join(parts) + (f"; training {new} new" if new else "") + "."


def _from(p: Planned) -> str:
    from rredcot.runlog import checkpoints

    return f" (from {checkpoints(p.run)[-1].name})" if p.state == "resume" else ""


class Forward:
    """Ctrl-C (SIGINT) and SIGTERM while compare trains are passed on to the running `rredcot train`, which
    finishes its step, saves a checkpoint and exits; compare waits for it. The child has its own session, so a
    terminal's Ctrl-C reaches it only this way, once (two would make it stop without saving). A second signal
    is passed on too (the child then stops at once, as a train does); a third kills it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, console) -> None:
        self.console, self.count, self.child, self.what = console, 0, None, ""
        self._old: dict[int, object] = {}

    def run(self, cmd: list[str], what: str) -> subprocess.CompletedProcess:
        """`cmd` to its end (its output captured), signals passed on to it."""
        with subprocess.Popen(  # its own session: a terminal's Ctrl-C reaches it only through _handle
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as proc:
            self.child, self.what = proc, what
            try:
                out, err = proc.communicate()
            except BaseException:  # not a signal (those are handled): the child must not outlive compare
                proc.kill()
                raise
            finally:
                self.child = None
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def _handle(self, signum: int, frame) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.child is None or self.child.poll() is not None:
            if self.count > 1:
                raise KeyboardInterrupt(name)
            self.console.print(f"[yellow]{name}: stopping compare before the next run starts.")
            return
        if self.count >= 3:  # the child did not answer two signals (stuck outside Python?)
            self.console.print(f"[yellow]{name} a third time: killing {self.what}.")
            self.child.kill()
            return
        self.child.send_signal(signum)
        self.console.print(
            f"[yellow]{name}: {self.what} finishes its step and saves a checkpoint (send it again to stop now)."
            if self.count == 1
            else f"[yellow]{name} again: {self.what} stops now, without saving (its last checkpoint stays)."
        )

    def __enter__(self) -> Forward:
        self._old = install(self.SIGNALS, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        restore(self._old)
