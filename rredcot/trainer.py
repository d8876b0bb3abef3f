"""The trainer, in torchtune's recipe shape: `setup`, then per RL step `step` (five timed stage calls:
rollout -> verify -> segment -> redistribute -> update, returning one StepRecord) and `after_step` (metrics,
collapse watch, non-finite count, stop requests, checkpoints), then `evaluate` and `save`.

Each stage is a registry entry chosen by config (`rredcot list` shows them); the trainer never branches on
their names. Batch semantics per RL step: P = train.generation_batch_size / rollout.group_size prompts,
G = rollout.group_size completions each, N = P * G completions, optimised in update.steps_per_generation
optimizer steps of micro-batches of update.micro_batch_size, repeated update.num_iterations times.

Launched on W processes (torchrun, accelerate launch), each rank samples, verifies, segments and
redistributes its own block of the step's prompt groups (rredcot/collectives.py); the update's gradients
are averaged by DDP (or sharded by FSDP2 / ZeRO: rredcot/sharding.py); rank 0 alone writes the run directory.
"""
from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from rredcot import collectives, lora, sharding
from rredcot.checks import check_config
from rredcot.assemble import PromptSampler, build_stages, policy_context
from rredcot.critic import Critic
from rredcot.errors import UserError
from rredcot.evaluate import eval_row, evaluate_all
from rredcot.metrics import gather_step, global_metrics, sample_rows
from rredcot.optim import build_optimizer, compile_layers, enable_checkpointing
from rredcot.runlog import MetricsLog, check_run_dir, default_run_dir, init_run_dir, save_checkpoint
from rredcot.stages.sampling import row_seeds
from rredcot.stages.segment import PieceDecoder, run_segment
from rredcot.stages.update import Learner, update_policy
from rredcot.stages.verify import check_golds, run_verify
from rredcot.startup import prompt_limit, startup_notes, task_sets
from rredcot.stopping import STOP_FILE, GracefulStop
from rredcot.task.warmstart import load_policy
from rredcot.types import Credit, Rollout, Segmented, Verified
from rredcot.ui import console, make_progress, note, quiet_unless, summary_table
from rredcot.watch import CollapseWatch


@dataclass
class StepRecord:
    """What one RL step produced on this rank: the stage records, the update's statistics, each stage's time."""

    step: int
    rollout: Rollout
    verified: Verified
    segmented: Segmented
    credit: Credit
    update: dict[str, float]
    times: dict[str, float] = field(default_factory=dict)  # stage -> seconds


@contextmanager
def timed(times: dict[str, float], name: str):
    """times[name] = the block's wall time (one line per stage in `Trainer.step`, as verl's marked_timer)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        times[name] = time.perf_counter() - t


class Trainer:
    """One RL run: `Trainer(cfg, overrides).fit()`; or `setup(progress)` then `step(n)` / `after_step(record)`
    one at a time (tests run a single step in-process this way)."""

    def __init__(self, cfg: DictConfig, overrides: list[str] = ()):
        self.cfg, self.overrides = cfg, list(overrides)
        self.nonfinite = 0  # consecutive steps whose every optimizer step was skipped for a NaN/inf gradient

    # ---- setup: before step 1 -----------------------------------------------------------------------------

    def setup(self, progress) -> None:
        """Checks, run directory, data, model, optimizer and resume state, in that order: a config, data or
        model error leaves nothing behind (the run directory is written only once they all loaded)."""
        self._setup_launch()
        self.stages = build_stages(self.cfg)
        self._setup_policy(progress)
        self._setup_optimizer()
        self._setup_loop(progress)

    def _setup_launch(self) -> None:
        cfg = self.cfg
        self.accelerator = sharding.make_accelerator(cfg.device)
        self.main = collectives.is_main()
        quiet_unless(self.main)
        cfg.world_size = check_config(cfg, world_size=collectives.size(), will_shard=sharding.will_shard(self.accelerator))
        if not cfg.run_dir:
            cfg.run_dir = collectives.broadcast(str(default_run_dir()))  # one name, chosen by rank 0
        self.run, self.ckpt = check_run_dir(cfg)
        set_seed(cfg.seed)

    def _setup_policy(self, progress) -> None:
        """The starting policy, the data, the run directory, the resume state and the reference model."""
        cfg, ckpt = self.cfg, self.ckpt
        with collectives.main_first():  # rank 0 builds the warm-start cache and the data caches; the others reuse them
            model, self.tokenizer = load_policy(cfg, progress)
            set_seed(cfg.seed)  # again: training the warm start (vs loading it cached) must not change the RL run
            self.train_set, self.eval_sets = task_sets(cfg, self.tokenizer, prompt_limit(cfg, model))
        check_golds({"train": self.train_set, **self.eval_sets}, self.stages.reward_funcs.verifier,
                    cfg.task.get("max_bad_fraction", 0.01))
        startup_notes(cfg, self.tokenizer)
        if lora.enabled(cfg):  # the base weights stay; the adapter is new, or the checkpoint's
            model = lora.wrap(model, cfg, resume_from=ckpt)
        if self.main:
            init_run_dir(self.run, cfg, self.overrides, ckpt)  # only now: a config, data or model error leaves nothing
        self.log = MetricsLog(self.run, cfg, enabled=self.main)
        self.start, self.resume_state = 0, None
        if ckpt is not None:
            self.resume_state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
            self.start = self.resume_state["step"]
            self.log.keep_until(self.start, unfinished=not (self.run / "eval.json").exists())
        beta = cfg["update"].beta
        if lora.enabled(cfg):
            self.ref_model = lora.AdapterOff(model) if beta > 0 else None
        else:
            self.ref_model = copy.deepcopy(model).requires_grad_(False).eval() if beta > 0 else None  # the starting policy
            if ckpt is not None:
                model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=next(model.parameters()).dtype)
        self.model = model

    def _setup_optimizer(self) -> None:
        """Checkpointing, compilation, AdamW and its schedule, accelerate's prepare, the resumed optimizer state."""
        cfg, upd = self.cfg, self.cfg["update"]
        if upd.gradient_checkpointing:  # recompute activations in backward: memory for compute
            enable_checkpointing(self.model)
        if upd.get("compile"):  # after LoRA and checkpointing: it compiles the layers as they will run
            compile_layers(self.model)
        total_opt_steps = cfg.train.steps * upd.num_iterations * upd.steps_per_generation
        optimizer, scheduler = build_optimizer(self.model, cfg.optim, max(total_opt_steps, 1))
        sharding.configure_engine(self.accelerator, upd)
        self.model, optimizer = self.accelerator.prepare(self.model, optimizer)
        if self.ref_model is not None and not isinstance(self.ref_model, lora.AdapterOff):
            self.ref_model = self.ref_model.to(self.accelerator.device)
        if self.resume_state is not None:
            sharding.load_optimizer(self.model, optimizer, self.resume_state["optimizer"])
            scheduler.load_state_dict(self.resume_state["scheduler"])
            torch.set_rng_state(self.resume_state["rng"])
        self.learner = Learner(self.model, optimizer, scheduler, self.accelerator, self.ref_model)

    def _setup_loop(self, progress) -> None:
        cfg, policy = self.cfg, self.accelerator.unwrap_model(self.model)
        drawn = self.resume_state["drawn"] if self.resume_state is not None else 0
        self.sampler = PromptSampler(len(self.train_set), cfg.seed, drawn)
        self.pieces = PieceDecoder(self.tokenizer)
        self.backend = self.stages.make_backend(policy, self.tokenizer)
        self.critic = Critic(policy, cfg.train.get("critic_lag", 0), self.start)
        self.watch = CollapseWatch(cfg.train.get("collapse_drop", 0.2), cfg.train.get("collapse_window", 10),
                                   cfg.train.get("collapse_clip", 0.05))
        self.progress = progress
        self.bar = progress.add_task("RL", total=cfg.train.steps, completed=self.start)

    # ---- one RL step ----------------------------------------------------------------------------------------

    def step(self, step: int) -> StepRecord:
        """Sample, verify, segment, redistribute and update on this rank's block of the step's prompt groups."""
        cfg, G, times = self.cfg, self.cfg.rollout.group_size, {}
        offset, batch = collectives.shard([self.train_set[i] for i in self.sampler.take(self.prompts_per_step)])
        seeds = row_seeds(cfg.seed, "train", step, range(offset * G, (offset + len(batch)) * G))
        ctx = policy_context(cfg, self.critic.model, self.tokenizer, self.stages, self.backend, step)
        funcs, verify_budget = self.stages.reward_funcs, cfg.verify.budget_s
        with sharding.full_weights(self.model):  # generation and probe chunks differ per rank
            with timed(times, "rollout"):
                self.backend.wake()  # a colocated engine takes its memory back for sampling (and MC values)
                ro = self.stages.rollout(self.backend, self.tokenizer, batch, seeds=seeds)
            with timed(times, "verify"):
                ver = run_verify(ro.texts, ro.samples, funcs, verify_budget)
            with timed(times, "segment"):
                seg = run_segment(ro, self.stages.segment, self.pieces, self.stages.marker)
            with timed(times, "redistribute"):
                credit = self.stages.redistribute(ro, ver, seg, ctx)
        with timed(times, "update"):
            self.backend.sleep()  # ... and gives it to the gradient passes
            upd = update_policy(self.learner, ro, credit, cfg["update"], temperature=cfg.rollout.temperature,
                                max_completion_length=cfg.rollout.max_new_tokens)
            self.backend.sync(self.accelerator.unwrap_model(self.model))  # the next samples come from the new weights
            self.critic.after_step(step)
        return StepRecord(step, ro, ver, seg, credit, upd, times)

    @property
    def prompts_per_step(self) -> int:
        return self.cfg.train.generation_batch_size // self.cfg.rollout.group_size

    def after_step(self, rec: StepRecord, stop_requested: bool = False) -> bool:
        """Metrics of the whole batch, the collapse watch, held-out evaluation, samples, the non-finite count,
        stop requests and checkpoints. Every rank calls it (it holds collectives). Returns whether to stop."""
        cfg, step = self.cfg, rec.step
        records = gather_step(rec.rollout, rec.verified, rec.segmented, rec.credit)  # the whole batch's
        row = {"step": step, **global_metrics(records, rec.update, rec.times, cfg.rollout.group_size)}
        warning = self.watch.update(step, row)
        if warning:
            note(warning)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            row.update(eval_row(cfg, self.evaluate(step, sampled=False)))
        self.log.log(row)
        if step % cfg.train.log_every == 0 or step == 1:
            self.log.samples(step, sample_rows(*records[:3], cfg.train.samples_per_log))
        self._count_nonfinite(rec.update)
        stopping = collectives.any_rank(stop_requested)  # a request that reached one rank stops all
        if stopping or (cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps):
            self.save(step)
        self.progress.update(self.bar, advance=1, description=f"RL reward {row['reward/mean']:.2f} acc "
                             f"{row['accuracy']:.2f} {row['time/step_s']:.2f}s/step")
        return stopping

    def _count_nonfinite(self, upd: dict[str, float]) -> None:
        limit = self.cfg.train.max_nonfinite_steps
        self.nonfinite = self.nonfinite + 1 if upd.get("skipped_nonfinite", 0) == 1 else 0
        if self.nonfinite >= limit:
            raise UserError(f"{self.nonfinite} steps in a row had non-finite gradients (NaN or inf) and were skipped "
                            f"(train.max_nonfinite_steps={limit}); the weights are the last finite ones. Lower optim.lr "
                            "or update.max_grad_norm, and resume from the last checkpoint.")

    # ---- evaluation and checkpoints ------------------------------------------------------------------------

    def evaluate(self, step: int, sampled: bool) -> dict[str, dict[str, Any]]:
        """Every held-out split's metrics (greedy; with `sampled`, also pass@k of sampled completions)."""
        with sharding.full_weights(self.model):  # ranks evaluate different prompt counts: no per-forward collectives
            return evaluate_all(self.backend, self.tokenizer, self.eval_sets, self.cfg, self.stages.reward_funcs,
                                sampled, step)

    def save(self, step: int) -> None:
        """A checkpoint of step `step` (every rank takes part: gathering sharded weights is a collective)."""
        learner = self.learner
        own = (p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters())  # FSDP2: this rank's shard
        finite = all(bool(torch.isfinite(t).all()) for t in own)
        if collectives.any_rank(not finite):
            raise UserError(f"The weights are not finite after step {step}; no checkpoint was saved, so the last one "
                            "is still good. Lower optim.lr or update.max_grad_norm and resume from it.")
        weights, optim_state = sharding.full_state(self.accelerator, self.model, learner.optimizer)
        if self.main:
            state = {"step": step, "drawn": self.sampler.drawn, "optimizer": optim_state,
                     "scheduler": learner.scheduler.state_dict(), "rng": torch.get_rng_state(),
                     "world_size": collectives.size()}
            save_checkpoint(self.run, step, self.accelerator.unwrap_model(self.model), self.tokenizer, state,
                            self.cfg.train.save_total_limit, state_dict=weights)
        collectives.barrier()  # no rank goes on (or exits) before the checkpoint is complete

    # ---- the whole run ----------------------------------------------------------------------------------------

    def fit(self) -> Path:
        """setup, the starting evaluation, the steps, the final checkpoint and evaluation; returns the run directory."""
        cfg = self.cfg
        with make_progress(cfg.logging.progress and collectives.is_main()) as progress:
            self.setup(progress)
            first = self._first_eval()
            with GracefulStop(self.run / STOP_FILE if self.main else None) as stop:  # rank 0 looks for the file
                for step in range(self.start + 1, cfg.train.steps + 1):
                    if self.after_step(self.step(step), stop.requested is not None) and step < cfg.train.steps:
                        self._stop_after(step, stop.requested)
            self.save(cfg.train.steps)
            final = self.evaluate(cfg.train.steps, True)
            if self.main:
                (self.run / STOP_FILE).unlink(missing_ok=True)  # a request that came too late to matter
            self.log.log({"step": cfg.train.steps, **eval_row(cfg, final, ("accuracy", "pass@1"))})
            self.log.close()
        self._write_result(first, final)
        return self.run

    def _first_eval(self) -> dict[str, dict[str, Any]] | None:
        """The starting metrics (step 0), kept in eval_start.json for eval.json across resumes."""
        start_file = self.run / "eval_start.json"
        if self.start > 0:
            return json.loads(start_file.read_text()) if start_file.exists() else None
        first = self.evaluate(0, True)
        self.log.log({"step": 0, **eval_row(self.cfg, first)})
        if self.main:
            start_file.write_text(json.dumps(first))
        return first

    def _stop_after(self, step: int, why: str | None) -> None:
        """A stop request was served at a step boundary (checkpointed in after_step): say how to continue."""
        if self.main:
            (self.run / STOP_FILE).unlink(missing_ok=True)  # served: a resumed run does not stop again
        console.print(f"[yellow]Stopped after step {step}; continue with: rredcot train resume=true run_dir={self.run}")
        self.log.close()
        raise KeyboardInterrupt(why or "a stop request on another rank")

    def _write_result(self, first, final) -> None:
        primary = self.cfg.eval.split
        result = {"start": first and first[primary], "final": final[primary], "steps": self.cfg.train.steps,
                  "split": primary, "splits": {s: {"start": first and first[s], "final": final[s]} for s in final}}
        if self.main:
            (self.run / "eval.json").write_text(json.dumps(result, indent=2))
            console.print(summary_table(self.run, result))


def train(cfg: DictConfig, overrides: list[str] = ()) -> Path:
    """Run RL training as configured (`overrides`: the command line, saved with the run); returns the run directory."""
    return Trainer(cfg, overrides).fit()
