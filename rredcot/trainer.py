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

import json
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from rredcot import collectives, sharding
from rredcot.assemble import policy_context
from rredcot.dynamic_sampling import fill_batch
from rredcot.errors import UserError
from rredcot.evaluate import eval_row, evaluate_all
from rredcot.metrics import gather_step, global_metrics, sample_rows
from rredcot.runlog import save_checkpoint
from rredcot.stages.reward_funcs import completion_id_lists
from rredcot.stages.sampling import row_seeds
from rredcot.stages.segment import run_segment
from rredcot.stages.shaping import shape_overlong
from rredcot.stages.update import update_policy
from rredcot.stages.verify import run_verify
from rredcot.stopping import STOP_FILE, GracefulStop
from rredcot.trainer_setup import Setup
from rredcot.types import Credit, Rollout, Segmented, Verified
from rredcot.ui import console, make_progress, note, summary_table


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
    sampling: dict[str, float] = field(default_factory=dict)  # train.dynamic_sampling's counts (sampling/*)


@contextmanager
def timed(times: dict[str, float], name: str):
    """times[name] += the block's wall time (one line per stage in `Trainer.step`, as verl's marked_timer; a stage
    run once per generation batch, as dynamic sampling does, adds up)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t


class Trainer(Setup):
    """One RL run: `Trainer(cfg, overrides).fit()`; or `setup(progress)` then `step(n)` / `after_step(record)`
    one at a time (tests run a single step in-process this way). `setup` and what it builds: trainer_setup.py."""

    def __init__(self, cfg: DictConfig, overrides: list[str] = ()):
        self.cfg, self.overrides = cfg, list(overrides)
        self.nonfinite = 0  # consecutive steps whose every optimizer step was skipped for a NaN/inf gradient
        self.accelerator = None  # set by _setup_launch (trainer_setup.py)

    # ---- one RL step ----------------------------------------------------------------------------------------

    def step(self, step: int) -> StepRecord:
        """Sample, verify, segment, redistribute and update on this rank's block of the step's prompt groups."""
        cfg, times = self.cfg, {}
        with ExitStack() as gathered:  # the rollout's time includes gathering sharded weights, the update's resharding
            with timed(times, "rollout"):
                ctx = policy_context(cfg, self.critic.model, self.tokenizer, self.stages, self.backend, step)
                gathered.enter_context(sharding.full_weights(self.model))  # generation, probe chunks differ per rank
                self.backend.wake()  # a colocated engine takes its memory back for sampling (and MC values)
            ro, ver, sampling = self._sample(step, times)
            with timed(times, "segment"):
                seg = run_segment(ro, self.stages.segment, self.pieces, self.stages.marker)
            with timed(times, "redistribute"):
                credit = self.stages.redistribute(ro, ver, seg, ctx)
                ro.kv = None  # the probes are done: the sampler's KV cache goes before the gradient passes need memory
            with timed(times, "update"):
                gathered.close()  # reshard: the gradient passes run sharded
                self.backend.sleep()  # ... and the engine gives its memory to them
                upd = update_policy(
                    self.learner,
                    ro,
                    credit,
                    cfg["update"],
                    temperature=cfg.rollout.temperature,
                    max_completion_length=cfg.rollout.max_new_tokens,
                )
                # the next samples come from the new weights
                self.backend.sync(self.accelerator.unwrap_model(self.model))
                self.critic.after_step(step)
        return StepRecord(step, ro, ver, seg, credit, upd, times, sampling)

    def _sample(self, step: int, times: dict[str, float]) -> tuple[Rollout, Verified, dict[str, float]]:
        """This rank's completions of the step, verified (and overlong-shaped); with train.dynamic_sampling,
        drawn in as many generation batches as fill the step with groups that carry a signal."""
        cfg, G, P = self.cfg, self.cfg.rollout.group_size, self.prompts_per_step

        def draw(round_: int) -> tuple[Rollout, Verified]:
            with timed(times, "rollout"):
                offset, batch = collectives.shard([self.train_set[i] for i in self.sampler.take(P)])
                first = (round_ * P + offset) * G  # global rows: round 0's are the plain step's
                seeds = row_seeds(cfg.seed, "train", step, range(first, first + len(batch) * G))
                ro = self.stages.rollout(self.backend, self.tokenizer, batch, seeds=seeds)
                if cfg.train.get("dynamic_sampling", False):
                    ro.kv = None  # the kept groups are regrouped into a new batch: the cache's rows would not match
            with timed(times, "verify"):
                ver = run_verify(
                    ro.texts, ro.samples, self.stages.reward_funcs, cfg.verify.budget_s, completion_id_lists(ro), step
                )
                v = cfg.verify
                ver = shape_overlong(
                    ro, ver, cfg.rollout.max_new_tokens, v.get("overlong_buffer", 0), v.get("overlong_penalty", 1.0)
                )
            return ro, ver

        if not cfg.train.get("dynamic_sampling", False):
            return (*draw(0), {})
        extra = cfg.train.get("max_extra_generation_batches", 10)
        return fill_batch(draw, P, G, extra, self.tokenizer.pad_token_id)

    @property
    def prompts_per_step(self) -> int:
        return self.cfg.train.generation_batch_size // self.cfg.rollout.group_size

    def after_step(self, rec: StepRecord, stop_requested: Callable[[], bool] = lambda: False) -> bool:
        """Metrics of the whole batch, the collapse watch, held-out evaluation, samples, the non-finite count,
        stop requests and checkpoints. Every rank calls it (it holds collectives). Returns whether to stop.
        stop_requested is asked after the step's evaluation and samples, so a request that came during them
        is served at this step's boundary."""
        cfg, step = self.cfg, rec.step
        records = gather_step(rec.rollout, rec.verified, rec.segmented, rec.credit)  # the whole batch's
        row = {"step": step, **global_metrics(records, rec.update, rec.times, cfg.rollout.group_size), **rec.sampling}
        warning = self.watch.update(step, row)
        if warning:
            note(warning)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            row.update(eval_row(cfg, self.evaluate(step, sampled=False)))
        self.log.log(row)
        if step % cfg.train.log_every == 0 or step == 1:
            self.log.samples(step, sample_rows(*records[:3], cfg.train.samples_per_log))
        self._count_nonfinite(rec.update)
        stopping = collectives.any_rank(stop_requested())  # a request that reached one rank stops all
        if stopping or (cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps):
            self.save(step)
        self.progress.update(
            self.bar,
            advance=1,
            description=f"RL reward {row['reward/mean']:.2f} acc {row['accuracy']:.2f} {row['time/step_s']:.2f}s/step",
        )
        return stopping

    def _count_nonfinite(self, upd: dict[str, float]) -> None:
        limit = self.cfg.train.max_nonfinite_steps
        self.nonfinite = self.nonfinite + 1 if upd.get("skipped_nonfinite", 0) == 1 else 0
        if self.nonfinite >= limit:
            raise UserError(
                f"{self.nonfinite} steps in a row had non-finite gradients (NaN or inf) and were skipped "
                f"(train.max_nonfinite_steps={limit}); the weights are the last finite ones. The rewards were "
                "finite (a verifier's NaN or inf is refused where it is returned), so the update diverged: lower "
                "optim.lr or update.max_grad_norm (or use update.autocast=null), and resume from the last checkpoint."
            )

    # ---- evaluation and checkpoints ------------------------------------------------------------------------

    def evaluate(self, step: int, sampled: bool) -> dict[str, dict[str, Any]]:
        """Every held-out split's metrics (greedy; with `sampled`, also pass@k of sampled completions)."""
        with sharding.full_weights(self.model):  # ranks evaluate different prompt counts: no per-forward collectives
            return evaluate_all(
                self.backend, self.tokenizer, self.eval_sets, self.cfg, self.stages.reward_funcs, sampled, step
            )

    def save(self, step: int) -> None:
        """A checkpoint of step `step` (every rank takes part: gathering sharded weights is a collective)."""
        learner = self.learner
        own = (
            p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()
        )  # FSDP2: this rank's shard
        finite = all(bool(torch.isfinite(t).all()) for t in own)
        if collectives.any_rank(not finite):
            raise UserError(
                f"The weights are not finite after step {step}; no checkpoint was saved, so the last one "
                "is still good. Lower optim.lr or update.max_grad_norm and resume from it."
            )
        staged = self.run / "checkpoints" / sharding.PARTITIONS  # ZeRO-1/2: every rank writes its partition here
        weights, optim_state = sharding.full_state(self.accelerator, self.model, learner.optimizer, staged)
        if self.main:
            state = {
                "step": step,
                "drawn": self.sampler.drawn,
                "optimizer": optim_state,
                "scheduler": learner.scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "world_size": collectives.size(),
            }
            save_checkpoint(
                self.run,
                step,
                self.accelerator.unwrap_model(self.model),
                self.tokenizer,
                state,
                self.cfg.train.save_total_limit,
                state_dict=weights,
                config_yaml=OmegaConf.to_yaml(self.cfg, resolve=True),
                moved_in=staged,
            )
        collectives.barrier()  # no rank goes on (or exits) before the checkpoint is complete

    # ---- the whole run ----------------------------------------------------------------------------------------

    def fit(self) -> Path:
        """setup, the starting evaluation, the steps, the final checkpoint and evaluation; returns the run directory."""
        try:
            return self._fit()
        finally:
            self.release_run_dir()

    def _fit(self) -> Path:
        cfg = self.cfg
        self._setup_launch()  # first: the process group decides which rank shows progress
        with make_progress(cfg.logging.progress and self.main) as progress:
            self.setup(progress)
            first = self._first_eval()
            with GracefulStop(self.run / STOP_FILE if self.main else None) as stop:  # rank 0 looks for the file
                for step in range(self.start + 1, cfg.train.steps + 1):
                    if self.after_step(self.step(step), lambda: stop.requested is not None) and step < cfg.train.steps:
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
        result = {
            "start": first and first[primary],
            "final": final[primary],
            "steps": self.cfg.train.steps,
            "split": primary,
            "splits": {s: {"start": first and first[s], "final": final[s]} for s in final},
        }
        if self.main:
            (self.run / "eval.json").write_text(json.dumps(result, indent=2))
            console.print(summary_table(self.run, result))


def train(cfg: DictConfig, overrides: list[str] = ()) -> Path:
    """Run RL training as configured (`overrides`: the command line, saved with the run); returns the run directory."""
    return Trainer(cfg, overrides).fit()
