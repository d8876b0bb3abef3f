"""The run directory: config.yaml, metrics.jsonl, samples/, checkpoints/, eval.json.

Everything is a plain file that standard tools open (YAML, JSON lines, safetensors); the trackers of
logging.report_to (tensorboard, wandb, trackio: rredcot/trackers.py) are optional mirrors of metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rredcot.errors import UserError
from rredcot.runconfig import RESUMABLE, RUN_CONFIG, changes, said

CKPT_PREFIX = "step_"
# What `train` writes at a run directory's top level: a new run never starts where one of them exists.
RUN_FILES = {"config.yaml", "overrides.yaml", "metrics.jsonl", "eval.json", "eval_start.json", "resumes.jsonl"}
RUN_FILES |= {"samples", "checkpoints", "tensorboard", "wandb"}


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d_%H%M%S")


def check_run_dir(cfg: DictConfig) -> tuple[Path, Path | None]:
    """(the run directory, the checkpoint a resume starts from), checked before any work: never
    overwrites a run, resume needs an intact checkpoint and steps left."""
    run = Path(cfg.run_dir) if cfg.run_dir else default_run_dir()
    has_run = (run / "metrics.jsonl").exists() or (run / "checkpoints").exists()
    if has_run and not cfg.resume:
        if not checkpoints(run) and not (run / "eval.json").exists():
            raise UserError(
                f"Run directory {str(run)!r} holds a run that stopped before its first checkpoint, so there "
                f"is nothing to resume. Remove it (rm -r {run}) to start again there, or choose another run_dir=PATH."
            )
        raise UserError(
            f"Run directory {str(run)!r} already holds a run. To continue it, add resume=true; "
            "to start a new one, choose another run_dir=PATH (nothing was overwritten)."
        )
    taken = sorted(p.name for p in run.iterdir() if p.name in RUN_FILES) if run.is_dir() and not has_run else []
    if taken and not cfg.resume:
        raise UserError(
            f"run_dir={str(run)!r} already holds {', '.join(taken)}, which a new run would overwrite (nothing was "
            "changed). Choose another run_dir=PATH (a new or empty directory), or move those files away."
        )
    if cfg.resume:
        read_metrics(run)  # a damaged metrics.jsonl is found before anything is written (a cut-off last line: a note)
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise UserError(
                f"resume=true but {str(run)!r} has no intact checkpoint to resume from (the run stopped "
                f"before its first one was written). Remove it (rm -r {run}) and start again without "
                "resume=true, or point run_dir at another run."
            )
        check_edits(run, ckpt)
        start = load_state(ckpt)["step"]
        if start > cfg.train.steps:
            raise UserError(
                f"The run in {str(run)!r} is at step {start} already, past train.steps={cfg.train.steps}. "
                f"Resume with train.steps={start} or more (a run never goes back; its checkpoints/ keep "
                f"the earlier steps that save_total_limit left)."
            )
        if start == cfg.train.steps and (run / "eval.json").exists():
            raise UserError(
                f"The run in {str(run)!r} has finished its {start} steps. To train it further, resume with "
                f"more steps (train.steps={start * 2}); to evaluate it, `rredcot eval checkpoint={run}`."
            )
        return run, ckpt
    return run, None


def check_edits(run: Path, ckpt: Path) -> None:
    """config.yaml against the config `ckpt` was trained with (its run_config.yaml; a checkpoint of an older
    rredcot has none): a key a resume may not change that differs was edited by hand, and is refused like such
    an override; a resumable one is said."""
    from rredcot.ui import note

    if not (ckpt / RUN_CONFIG).exists():
        return
    diff = changes(OmegaConf.load(ckpt / RUN_CONFIG), OmegaConf.load(run / "config.yaml"))
    edited = {k: v for k, v in diff.items() if not k.startswith(RESUMABLE)}
    if edited:
        raise UserError(
            f"{str(run / 'config.yaml')!r} differs from the config its checkpoint {ckpt.name} was trained with "
            f"(edited by hand?): {said(edited)}. A resume continues the run as it was trained. To resume, restore "
            f"the file (cp {ckpt / RUN_CONFIG} {run / 'config.yaml'}); to train with the new values, start a new "
            "run with them as overrides (another run_dir)."
        )
    told = {k: v for k, v in diff.items() if not k.startswith(("world_size", "resume", "run_dir"))}
    if told:
        note(f"{run / 'config.yaml'} differs from the config {ckpt.name} was saved with: {said(told)}.")


def load_state(ckpt: Path, mmap: bool = True) -> dict[str, Any]:
    """trainer_state.pt, with torch's weights-only unpickler: tensors, numbers, strings and containers only, so a
    crafted file cannot run code (all a rredcot checkpoint holds: step, optimizer and scheduler state, the RNG
    state). mmap: reading the step or checking that it parses does not read the optimizer state (gigabytes for
    a real model). Checked against torch 2.13's torch.load (weights_only, mmap)."""
    import pickle

    path = ckpt / "trainer_state.pt"
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{str(path)!r} holds objects other than tensors, numbers and containers ({_first_line(e)}). rredcot "
            "never unpickles those (that would run code from the file); a checkpoint rredcot wrote never holds "
            "them. Use a checkpoint made by `rredcot train`, or only its weights: `rredcot eval "
            f"checkpoint={ckpt}` reads them without this file."
        ) from None


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__


def init_run_dir(run: Path, cfg: DictConfig, overrides: list[str] = (), ckpt: Path | None = None) -> None:
    """Create the run directory and write the resolved config and the command line that made it. A
    resume rewrites config.yaml (only RESUMABLE keys can differ), adds its overrides to overrides.yaml
    and a line to resumes.jsonl (when, from which step, with what)."""
    from rredcot.runconfig import OVERRIDES_FILE, save_overrides

    (run / "samples").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if not cfg.resume:
        save_overrides(run, list(overrides))
        return
    import yaml

    kept = [o for o in overrides if not o.lstrip("+").startswith(("resume=", "run_dir="))]
    before = yaml.safe_load((run / OVERRIDES_FILE).read_text()) if (run / OVERRIDES_FILE).exists() else []
    save_overrides(run, [*before, *kept])
    with (run / "resumes.jsonl").open("a") as f:
        f.write(
            json.dumps(
                {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from": ckpt.name if ckpt else None, "overrides": kept}
            )
            + "\n"
        )


def checkpoints(run: Path) -> list[Path]:
    """Finished step checkpoints of a run, oldest first (a `step_N.tmp` being written is never one)."""
    found = [p for p in (run / "checkpoints").glob(f"{CKPT_PREFIX}*") if p.name[len(CKPT_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX) :]))


def intact(ckpt: Path, state: bool = True) -> bool:
    """Every file a resume reads is there and parses (a kill can truncate any of them); state=False: the weights
    and config only (what eval and credit read). A state file that is not weights-only raises (load_state)."""
    from safetensors import safe_open

    try:
        for weights in ckpt.glob("*.safetensors"):
            with safe_open(str(weights), "pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        ok = not state or "step" in load_state(ckpt)
        return (ckpt / "config.json").exists() and ok and any(ckpt.glob("*.safetensors"))
    except UserError:
        raise
    except Exception:
        return False


def latest_checkpoint(run: Path, state: bool = True) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are named in a note and skipped (never deleted).
    state=False: trainer_state.pt is not read (eval and credit need only the weights)."""
    from rredcot.ui import note

    for ckpt in reversed(checkpoints(run)):
        if intact(ckpt, state):
            return ckpt
        note(f"checkpoint {ckpt} is damaged (interrupted while being written?): using the one before it.")
    return None


def resolve_checkpoint(path: str) -> Path:
    """A model directory (has config.json) or a run directory (its latest checkpoint)."""
    p = Path(path).expanduser()
    if (p / "config.json").exists():
        return p
    ckpt = latest_checkpoint(p, state=False)  # eval and credit read the weights only
    if ckpt is None:
        raise UserError(
            f"checkpoint={path!r} is neither a model directory (with config.json) nor a run directory "
            "with checkpoints/. Pass a run directory made by `rredcot train` or one of its checkpoints/step_N."
        )
    return ckpt


def save_checkpoint(
    run: Path,
    step: int,
    model,
    tokenizer,
    state: dict[str, Any],
    keep: int,
    state_dict: dict | None = None,
    config_yaml: str | None = None,
    moved_in: Path | None = None,
) -> Path:
    """save_pretrained (safetensors + tokenizer) plus trainer_state.pt for resume; prune old ones.
    state_dict: the full weights when the model is sharded over ranks (sharding.full_state). config_yaml: the
    config the weights were trained with (RUN_CONFIG), so a resume can tell a hand-edited config.yaml.
    moved_in: a folder every rank wrote into (ZeRO-1/2 optimizer partitions), moved in when it exists."""
    final = run / "checkpoints" / f"{CKPT_PREFIX}{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    for leftover in (run / "checkpoints").glob("*.tmp"):  # a write that a kill interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    if hasattr(model, "merge_and_unload"):  # a LoRA run: merged weights + the adapter (rredcot/lora.py)
        from rredcot.lora import save

        save(model, tmp, tokenizer)
    else:
        model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    if config_yaml is not None:
        (tmp / RUN_CONFIG).write_text(config_yaml)
    if moved_in is not None and moved_in.exists():
        moved_in.rename(tmp / moved_in.name)  # before the rename below: the checkpoint is whole or absent
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a crash mid-save never leaves a checkpoint that looks complete
    for old in checkpoints(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


class MetricsLog:
    """Appends one JSON object per step to metrics.jsonl, mirrored to the trackers of logging.report_to
    (rredcot/trackers.py)."""

    def __init__(self, run: Path, cfg: DictConfig, enabled: bool = True):
        from rredcot.trackers import open_trackers

        self.path = run / "metrics.jsonl"
        self.run, self.enabled = run, enabled  # enabled=False: a data-parallel rank other than 0 writes nothing
        self.trackers = open_trackers(run, cfg) if enabled else []

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        for tracker in self.trackers:
            tracker.log(int(row["step"]), clean)

    def keep_until(self, step: int, unfinished: bool = True) -> None:
        """Drop rows after `step` (a resumed run logged them before it was killed; they are redone), and,
        when the run never finished (`unfinished`: no eval.json), a final-evaluation row at `step` (the
        only rows with pass@1 are final ones; a kill during the final evaluation leaves one behind)."""
        if self.enabled and self.path.exists():
            rows = read_metrics(self.run, quiet=True)  # check_run_dir said it if the last line was cut off
            rows = [r for r in rows if r["step"] < step or (r["step"] == step and not (unfinished and _is_final(r)))]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        with (self.run / "samples" / f"step_{step:06d}.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        for tracker in self.trackers:  # the completions table (wandb, trackio)
            tracker.table(step, [{"step": step, **r} for r in rows])

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def _is_final(row: dict[str, Any]) -> bool:
    return any(k.endswith("/pass@1") for k in row)


def eval_prefix(split: str, primary: str) -> str:
    """metrics.jsonl key prefix of a held-out split: eval/... for eval.split, eval_<split>/... for the extra ones."""
    return "eval" if split == primary else f"eval_{split}"


def read_metrics(run: Path, quiet: bool = False) -> list[dict[str, Any]]:
    """metrics.jsonl's rows. A last line cut short (a kill or a full disk mid-write: no newline after it) is
    dropped, with a note unless `quiet`; any other line that is not a metrics row is an error naming it."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as e:
            if i == len(lines) and not line.endswith("\n"):
                if not quiet:
                    from rredcot.ui import note

                    note(f"{path}: its last line was cut off mid-write (the run was killed?) and is ignored.")
                break
            raise UserError(
                f"{str(path)!r} line {i} is not a metrics row ({_first_line(e)}): the file was edited or damaged. "
                f"Delete that line (e.g. sed -i '{i}d' {path}) or restore the file; a resume redoes the rows after "
                "its checkpoint, so rows lost after the last checkpoint cost nothing."
            ) from None
        rows.append(row)
    return rows
