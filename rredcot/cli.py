"""`rredcot`: train, eval, config show, list. Hydra overrides are plain arguments (key=value).

Errors a user can fix print as one paragraph and exit with status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from rredcot.errors import UserError
from rredcot.ui import console, err_console, metrics_table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="RL fine-tuning of reasoning models with GRPO and RREDCoT credit assignment.",
)
config_app = typer.Typer(no_args_is_help=True, help="Inspect the composed config.")
app.add_typer(config_app, name="config")
OVERRIDES = typer.Argument(None, help="Hydra overrides: key=value, group=option, +exp=NAME")


@app.command()
def train(overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Train with RL (the default config trains the built-in task)."""
    from rredcot.compose import load_config
    from rredcot.runconfig import config_for_resume
    from rredcot.trainer import train as run_train

    overrides = list(overrides or [])
    cfg = load_config(overrides)
    run_train(config_for_resume(overrides) if cfg.resume else cfg, overrides)


def _ranks(cfg):
    """(is rank 0, the device to evaluate on). Under torchrun / accelerate launch: the process group (the
    held-out prompts are split over the ranks and gathered) and one voice; otherwise device=auto is the
    GPU when there is one."""
    import torch

    from rredcot import collectives

    if collectives.env_world_size() > 1:
        from rredcot.sharding import make_accelerator
        from rredcot.ui import quiet_unless

        device = make_accelerator(cfg.device).device
        quiet_unless(collectives.is_main())
        return collectives.is_main(), device
    return True, torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def _one_process(command: str) -> None:
    from rredcot.collectives import env_world_size

    if env_world_size() > 1:
        raise UserError(
            f"rredcot {command} runs in one process, but it was launched on {env_world_size()}. Run it as "
            f"`rredcot {command} ...`; several processes are for `rredcot train` (and `rredcot eval`)."
        )


def _load_checkpoint(cfg):
    from rredcot.runlog import resolve_checkpoint
    from rredcot.task.model import load_pretrained, load_tokenizer, trusts_remote_code

    ckpt = resolve_checkpoint(cfg.checkpoint)
    remote = trusts_remote_code(cfg)
    return ckpt, load_pretrained(str(ckpt), trust_remote_code=remote), load_tokenizer(str(ckpt), remote)


def _credit_dir_free(out: Path) -> None:
    """Nothing a user has is overwritten: a run_dir they named that holds an earlier credit report is refused."""
    there = [n for n in ("credit.json", "credit.html", "credit.svg") if (out / n).exists()]
    if there:
        raise UserError(
            f"rredcot credit would write {', '.join(there)} into {str(out)!r}, which already holds them (nothing was "
            f"changed). Choose another run_dir=DIR, or leave run_dir out: a run's own credit goes to RUN/credit, "
            "RUN/credit-2, ... (never over an earlier one)."
        )


@app.command("eval")
def eval_cmd(overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Evaluate checkpoint=RUN_DIR_OR_CHECKPOINT on the held-out split, with the run's own task and
    settings; writes RUN/evals/<checkpoint>_<split>.json (never the run's eval.json)."""
    from rredcot.evaluate import evaluate
    from rredcot.runconfig import config_for_run, unique_path
    from rredcot.stages.verify import build_reward_funcs, check_golds
    from rredcot.startup import prompt_limit, startup_notes, task_sets

    cfg, run = config_for_run(list(overrides or []), "rredcot eval")
    main, device = _ranks(cfg)
    if not cfg.checkpoint:
        raise UserError(
            "rredcot eval needs checkpoint=PATH: a run directory made by `rredcot train` "
            "(its latest checkpoint is used) or a checkpoint directory such as RUN/checkpoints/step_000150."
        )
    ckpt, model, tokenizer = _load_checkpoint(cfg)
    model = model.to(device)
    samples = task_sets(cfg, tokenizer, prompt_limit(cfg, model))[1][cfg.eval.split]
    startup_notes(cfg, tokenizer)
    funcs = build_reward_funcs(cfg.verify)
    check_golds({cfg.eval.split: samples}, funcs.verifier, cfg.task.get("max_bad_fraction", 0.01))
    from rredcot.assemble import build_stages

    result = evaluate(build_stages(cfg).make_backend(model, tokenizer), tokenizer, samples, cfg, funcs)
    result.update(checkpoint=str(ckpt), split=cfg.eval.split, task=cfg.task.name, verifier=cfg.verify.name)
    if not main:  # the prompts were split over the ranks; rank 0 writes the gathered result
        return
    out_dir = Path(cfg.run_dir) if cfg.run_dir else (run or ckpt)
    path = unique_path(out_dir / "evals" / f"{ckpt.name}_{cfg.eval.split}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    console.print(
        metrics_table(
            f"rredcot eval: {ckpt} on {cfg.task.name} {cfg.eval.split} ({len(samples)} prompts)", {"value": result}
        )
    )
    console.print(f"wrote {path}")


@app.command("credit")
def credit_cmd(overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Show credit per segment on held-out traces (terminal + credit.html); credit.against=mc measures
    every estimator against Monte Carlo values (credit.json). checkpoint=RUN (its own task and settings)
    or, without it, the starting policy."""
    import time

    from rredcot.credit_report import credit_command, results_table
    from rredcot.runconfig import config_for_run, unique_path
    from rredcot.task.warmstart import load_policy

    _one_process("credit")
    cfg, run = config_for_run(list(overrides or []), "rredcot credit")
    if cfg.checkpoint:
        ckpt, model, tokenizer = _load_checkpoint(cfg)
        default_out = unique_path((run or ckpt) / "credit")
    else:
        model, tokenizer = load_policy(cfg)
        default_out = Path("runs") / f"credit_{time.strftime('%Y%m%d_%H%M%S')}"
    out = Path(cfg.run_dir) if cfg.run_dir else default_out
    _credit_dir_free(out)
    result = credit_command(cfg, model.eval(), tokenizer, out, console)
    if "estimators" in result:
        console.print(results_table(result))
    console.print(f"wrote {out / 'credit.json'}, {out / 'credit.html'} and {out / 'credit.svg'}")


@app.command()
def compare(
    args: Optional[List[str]] = typer.Argument(
        None, help="Hydra overrides for both methods; with --runs, run directories"
    ),
    baseline: str = typer.Option("grpo", help="algo preset or redistributor to compare against"),
    seeds: int = typer.Option(3, help="seeds per method (0, 1, ...)"),
    runs: bool = typer.Option(
        False, "--runs", help="build the report from finished run directories given as arguments"
    ),
    out: Optional[Path] = typer.Option(None, help="where the report goes (default runs/compare_<time>)"),
    split: Optional[str] = typer.Option(
        None,
        help="report this held-out split (each run's eval.split or one of its "
        "eval.extra_splits); default: the runs' eval.split",
    ),
) -> None:
    """Train the configured method and a baseline on identical seeds, evaluate both, write a report."""
    import time

    _one_process("compare")
    from rredcot.compare import train_pair
    from rredcot.compare_report import build_report

    if split not in (None, "dev", "test"):
        raise UserError(
            f"--split {split}: the held-out splits are dev and test (a run reports them when they are its "
            "eval.split or in its eval.extra_splits). Use --split dev or --split test, or leave it out."
        )
    out = out or Path("runs") / f"compare_{time.strftime('%Y%m%d_%H%M%S')}"
    if runs:
        if not args or len(args) < 2:
            raise UserError("compare --runs needs at least two run directories: rredcot compare --runs DIR_A DIR_B ...")
        dirs = [Path(a) for a in args]
    else:
        dirs = train_pair(list(args or []), baseline, seeds, out, console)
    summary = build_report(dirs, out, baseline, split)
    for v in summary["verdicts"].values():
        console.print(v["text"])
    console.print(f"wrote {out / 'report.md'} and {out / 'report.html'}")


@config_app.command("show")
def config_show(overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Print the composed, resolved config."""
    from omegaconf import OmegaConf

    from rredcot.compose import load_config

    console.print(OmegaConf.to_yaml(load_config(overrides, check_entries=False)), markup=False)


@app.command("list")
def list_cmd(overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Print every registry (stage -> names) and every config group (group -> options); with
    plugins=[...] and hydra.searchpath=[...], a plug-in's entries and configs too."""
    from rich.table import Table

    from rredcot.compose import groups, load_config, normalize_overrides, parse_overrides
    from rredcot.registry import STAGES, names

    overrides = normalize_overrides(list(overrides or []))
    if overrides:
        load_config(overrides, check_entries=False)  # imports the plug-ins
    table = Table(title="registries (choose with <stage>.name=..., loss with update.loss_type=...)")
    table.add_column("stage")
    table.add_column("names")
    for stage in STAGES:
        table.add_row(stage, ", ".join(names(stage)))
    console.print(table)
    table = Table(title="config groups (choose with group=option, e.g. exp=gsm8k)")
    table.add_column("group")
    table.add_column("options")
    for group, options in groups(parse_overrides(overrides)).items():
        table.add_row(group, ", ".join(options))
    console.print(table)


def main() -> None:
    from rredcot.oserrors import oserror_message
    from rredcot.ui import surviving_closed_output

    with surviving_closed_output():  # `rredcot train | head` must not kill the run
        try:
            app()
        except UserError as e:
            _error(str(e), e.exit_code)
        except OSError as e:  # a full disk, a read-only or unwritable path, a path too long ...
            text = oserror_message(e)
            if text is None:
                raise
            _error(text, 2)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)


def _error(text: str, code: int) -> None:
    err_console.print(Text("error: ", style="bold red") + Text(text), soft_wrap=True)
    sys.exit(code)
