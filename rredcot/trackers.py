"""Experiment trackers that mirror metrics.jsonl: `logging.report_to=[tensorboard, wandb, trackio]` (TRL's key
and names). Each gets every step's numbers; wandb and trackio also get the logged completions as a table.

    tensorboard  RUN/tensorboard/ event files (tensorboard --logdir RUN/tensorboard)
    wandb        RUN/wandb/ (WANDB_MODE=offline keeps it local; `wandb sync` uploads it later)
    trackio      its own local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio; `trackio show`)

metrics.jsonl stays the record: a tracker is a view of it. A tracker whose package is missing is refused
before any work (check_installed), naming the pip install; the old booleans logging.tensorboard / .wandb
still work, with a one-line note (report_to).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rredcot.errors import UserError

TRACKERS = ("tensorboard", "wandb", "trackio")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # tracker -> pip package
TABLE = "completions"  # the table's name, as TRL logs it


def report_to(cfg: DictConfig, say: bool = False) -> list[str]:
    """The trackers logging.report_to names, with the deprecated booleans folded in (said when `say`)."""
    log = cfg.logging
    names = [str(n) for n in (log.get("report_to") or [])]
    for old in ("tensorboard", "wandb"):
        if log.get(old):
            if say:
                from rredcot.ui import note

                note(f"logging.{old}=true is deprecated: it means logging.report_to=[{old}] (use that instead).")
            names.append(old)
    if say and log.get("wandb_project"):
        from rredcot.ui import note

        note(f"logging.wandb_project is deprecated: it is logging.project now (project {_project(cfg)!r}).")
    return list(dict.fromkeys(n for n in names if n != "none"))  # TRL's "none": no tracker


def check_installed(cfg: DictConfig) -> None:
    """Each chosen tracker is known and its package importable: refused before any work, with the fix."""
    for name in report_to(cfg):
        if name not in TRACKERS:
            raise UserError(
                f"logging.report_to names {name!r}, which is not a tracker rredcot has. Choose among "
                f"{', '.join(TRACKERS)} (TRL's names), e.g. logging.report_to=[tensorboard]."
            )
        if importlib.util.find_spec(name) is None:
            raise UserError(
                f"logging.report_to=[{name}] needs the {PACKAGES[name]} package, which is not installed here: "
                f"pip install {PACKAGES[name]} (or pip install 'rredcot[logging]' for every tracker), or drop "
                f"{name} from logging.report_to."
            )


def _project(cfg: DictConfig) -> str:
    return str(cfg.logging.get("wandb_project") or cfg.logging.project)  # the deprecated key, if a run set it


class TensorBoard:
    def __init__(self, run: Path, cfg: DictConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run / "tensorboard"))

    def log(self, step: int, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a run killed later still leaves its steps readable

    def table(self, step: int, rows: list[dict[str, Any]]) -> None:  # TensorBoard has no tables (as in TRL)
        pass

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run: Path, cfg: DictConfig):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=_project(cfg), name=_name(run, cfg), dir=str(run), config=OmegaConf.to_container(cfg, resolve=True)
        )

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.run.log(row, step=step)

    def table(self, step: int, rows: list[dict[str, Any]]) -> None:
        columns = list(rows[0]) if rows else []
        data = [[_cell(r.get(c)) for c in columns] for r in rows]
        self.run.log({TABLE: self.wandb.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, run: Path, cfg: DictConfig):
        import trackio

        self.trackio = trackio
        trackio.init(project=_project(cfg), name=_name(run, cfg), config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.trackio.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def table(self, step: int, rows: list[dict[str, Any]]) -> None:
        data = [{k: _cell(v) for k, v in r.items()} for r in rows]
        self.trackio.log({TABLE: self.trackio.Table(data=data)}, step=step)

    def close(self) -> None:
        self.trackio.finish()


def _name(run: Path, cfg: DictConfig) -> str:
    return str(cfg.logging.get("run_name") or Path(run).resolve().name)


def _cell(v: Any) -> Any:
    """A table cell: numbers and text as they are, anything else (a list of segment boundaries) as text."""
    return v if isinstance(v, (int, float, str)) or v is None else str(v)


def open_trackers(run: Path, cfg: DictConfig) -> list[Any]:
    """The trackers logging.report_to chooses, started (rank 0 only: the caller decides)."""
    check_installed(cfg)
    kinds = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}
    return [kinds[name](run, cfg) for name in report_to(cfg, say=True)]
