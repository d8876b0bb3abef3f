"""The training loop, top to bottom: rollout -> verify -> segment -> redistribute -> update.

Each stage is a registry entry chosen by config (`rredcot list` shows them); this loop never branches
on their names. Batch semantics per RL step: P = train.generation_batch_size / rollout.group_size
prompts, G = rollout.group_size completions each, N = P * G completions, optimised in
update.steps_per_generation optimizer steps of micro-batches of update.micro_batch_size, repeated
update.num_iterations times.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from rredcot import distributed, lora
from rredcot.config import rollout_options, stage_options
from rredcot.critic import Critic
from rredcot.errors import UserError
from rredcot.evaluate import evaluate
from rredcot.metrics import global_metrics, sample_rows
from rredcot.registry import get
from rredcot.runlog import MetricsLog, check_run_dir, default_run_dir, eval_prefix, init_run_dir, save_checkpoint
from rredcot.stages.rollout import prefix_seeds, row_seeds, sample_from_ids, sample_rollout
from rredcot.stages.segment import PieceDecoder, run_segment, think_marker
from rredcot.stages.update import build_optimizer, compile_layers, enable_checkpointing, update_policy
from rredcot.stages.values import PolicyContext
from rredcot.stages.verify import build_reward_funcs, check_golds, run_verify
from rredcot.startup import prompt_limit, startup_notes, task_sets
from rredcot.stopping import STOP_FILE, GracefulStop
from rredcot.task.warmstart import load_policy
from rredcot.types import Sample
from rredcot.ui import console, err_console, make_progress, note, summary_table
from rredcot.watch import CollapseWatch


@dataclass
class Stages:
    """The registry entries the config chose, with their options bound."""

    rollout: Callable  # (backend or model, tokenizer, samples) -> Rollout
    make_backend: Callable  # (model, tokenizer) -> the RolloutBackend that rollout.name chose
    reward_funcs: dict
    segment: Callable
    redistribute: Callable
    marker: str | None  # the model's end-of-thinking marker (model.think_end); None: it does not think


def build_stages(cfg: DictConfig) -> Stages:
    sampling, backend = rollout_options(cfg.rollout)
    return Stages(
        rollout=partial(sample_rollout, **sampling),
        make_backend=partial(get("rollout", cfg.rollout.name), **backend),
        reward_funcs=build_reward_funcs(cfg.verify),
        segment=partial(get("segment", cfg.segment.name), **stage_options(cfg.segment)),
        redistribute=partial(get("redistribute", cfg.redistribute.name), group_size=cfg.rollout.group_size,
                             **stage_options(cfg.redistribute)),
        marker=think_marker(cfg),
    )


def policy_context(cfg: DictConfig, model, tokenizer, stages: Stages, backend=None) -> PolicyContext:
    """What the value estimators see: the live policy, the task's verifier and forcing texts; Monte
    Carlo continuations come from the rollout backend (the model's own when none is given)."""
    ro = cfg.rollout

    def generate(prefixes, n, budgets):
        return sample_from_ids(backend or model, tokenizer, prefixes, n, budgets, temperature=ro.temperature,
                               top_p=ro.top_p, top_k=ro.top_k, seeds=prefix_seeds(cfg.seed, ctx.step, prefixes, n))

    ctx = PolicyContext(model=model, tokenizer=tokenizer, verifier=stages.reward_funcs["accuracy"][0],
                        force_text=cfg.task.get("forcing_text"), closing_text=cfg.task.get("closing_text") or "",
                        generate=generate, temperature=ro.temperature, max_new_tokens=ro.max_new_tokens)
    return ctx


class PromptSampler:
    """Draws prompt indices epoch by epoch, each epoch a seeded permutation; `drawn` is its whole state."""

    def __init__(self, n: int, seed: int, drawn: int = 0):
        self.n, self.seed, self.drawn, self._perm = n, seed, drawn, (None, None)

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, pos = divmod(self.drawn, self.n)
            if self._perm[0] != epoch:
                self._perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)))
            out.append(int(self._perm[1][pos]))
            self.drawn += 1
        return out


def evaluate_all(backend, tokenizer, sets: dict[str, list[Sample]], cfg: DictConfig, reward_funcs: dict,
                 sampled: bool = True, step: int = 0) -> dict[str, dict[str, Any]]:
    return {split: evaluate(backend, tokenizer, samples, cfg, reward_funcs, sampled, step) for split, samples in sets.items()}


def quiet_unless(main: bool) -> None:
    """Only rank 0 speaks: notes, progress and tables once, not once per process (errors still reach stderr)."""
    console.quiet = not main
    err_console.quiet = not main


def check_shardable(cfg: DictConfig) -> None:
    """What FSDP2 / ZeRO-3 cannot run: a second, unsharded copy of the policy (critic_lag), or an estimator whose
    backward passes (a different number per rank) would each be a collective."""
    if cfg.train.get("critic_lag", 0):
        raise UserError(f"train.critic_lag={cfg.train.critic_lag} keeps a second, frozen copy of the policy, which is not "
                        "sharded under FSDP or ZeRO-3. Use train.critic_lag=0 with these configs, or DDP (torchrun).")
    if getattr(get("redistribute", cfg.redistribute.name), "runs_backward", False):
        raise UserError(f"redistribute={cfg.redistribute.name} runs a backward pass per trace, and under FSDP or ZeRO-3 "
                        "each would be a collective that ranks with other trace counts never join. Use it with DDP "
                        "(torchrun, or conf/accelerate/ddp.yaml), or choose another estimator.")


def check_world_size(cfg: DictConfig) -> int:
    """The launched world size (recorded in the run's config.yaml); world_size=N on the command line must match it."""
    w = distributed.size()
    if cfg.get("world_size") not in (None, w):
        raise UserError(f"world_size={cfg.world_size} was set, but {w} process(es) were launched. world_size is recorded, "
                        f"not chosen: launch with torchrun --nproc_per_node {cfg.world_size} (or accelerate launch "
                        "--num_processes N), and leave world_size unset.")
    return w


def eval_row(cfg: DictConfig, results: dict[str, dict[str, Any]], keys: tuple[str, ...] = ("accuracy",)) -> dict[str, float]:
    """{"eval/accuracy": .., "eval_test/accuracy": ..}: the metrics.jsonl keys of each split's results."""
    return {f"{eval_prefix(split, cfg.eval.split)}/{k}": r[k] for split, r in results.items() for k in keys}


def train(cfg: DictConfig, overrides: list[str] = ()) -> Path:
    """Run RL training as configured (`overrides`: the command line, saved with the run); returns the run directory.

    Launched on W processes (torchrun, accelerate launch), each rank samples, verifies, segments and
    redistributes its own block of the step's prompt groups (rredcot/distributed.py); the update's
    gradients are averaged by DDP (or sharded by FSDP2 / ZeRO); rank 0 alone writes the run directory."""
    accelerator = distributed.make_accelerator(cfg.device)
    main = distributed.is_main()
    quiet_unless(main)
    cfg.world_size = check_world_size(cfg)
    if distributed.will_shard(accelerator):
        check_shardable(cfg)
    if not cfg.run_dir:
        cfg.run_dir = distributed.broadcast(str(default_run_dir()))  # one name, chosen by rank 0
    run, ckpt = check_run_dir(cfg)
    set_seed(cfg.seed)
    stages = build_stages(cfg)
    with make_progress(cfg.logging.progress and main) as progress:
        with distributed.main_first():  # rank 0 builds the warm-start cache and the data caches; the others reuse them
            model, tokenizer = load_policy(cfg, progress)
            set_seed(cfg.seed)  # again: training the warm start (vs loading it cached) must not change the RL run
            train_set, eval_sets = task_sets(cfg, tokenizer, prompt_limit(cfg, model))
        check_golds({"train": train_set, **eval_sets}, stages.reward_funcs["accuracy"][0], cfg.task.get("max_bad_fraction", 0.01))
        startup_notes(cfg, tokenizer)
        if lora.enabled(cfg):  # the base weights stay; the adapter is new, or the checkpoint's
            model = lora.wrap(model, cfg, resume_from=ckpt)
        if main:
            init_run_dir(run, cfg, overrides, ckpt)  # only now: a config, data or model error leaves nothing behind
        log = MetricsLog(run, cfg, enabled=main)
        start, drawn, resume_state = 0, 0, None
        if ckpt is not None:
            resume_state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
            start, drawn = resume_state["step"], resume_state["drawn"]
            log.keep_until(start, unfinished=not (run / "eval.json").exists())
        if lora.enabled(cfg):
            ref_model = lora.AdapterOff(model) if cfg["update"].beta > 0 else None
        else:
            ref_model = copy.deepcopy(model).requires_grad_(False).eval() if cfg["update"].beta > 0 else None
            if ckpt is not None:
                model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=next(model.parameters()).dtype)
        if cfg["update"].gradient_checkpointing:  # recompute activations in backward: memory for compute
            enable_checkpointing(model)
        if cfg["update"].get("compile"):  # after LoRA and checkpointing: it compiles the layers as they will run
            compile_layers(model)
        total_opt_steps = cfg.train.steps * cfg["update"].num_iterations * cfg["update"].steps_per_generation
        optimizer, scheduler = build_optimizer(model, cfg.optim, max(total_opt_steps, 1))
        distributed.configure_engine(accelerator, cfg["update"])
        model, optimizer = accelerator.prepare(model, optimizer)
        if ref_model is not None and not isinstance(ref_model, lora.AdapterOff):
            ref_model = ref_model.to(accelerator.device)
        if resume_state is not None:
            distributed.load_optimizer(model, optimizer, resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            torch.set_rng_state(resume_state["rng"])
        sampler = PromptSampler(len(train_set), cfg.seed, drawn)
        pieces = PieceDecoder(tokenizer)
        backend = stages.make_backend(accelerator.unwrap_model(model), tokenizer)
        critic = Critic(accelerator.unwrap_model(model), cfg.train.get("critic_lag", 0), start)
        ctx = policy_context(cfg, critic.model, tokenizer, stages, backend)
        prompts_per_step = cfg.train.generation_batch_size // cfg.rollout.group_size
        G = cfg.rollout.group_size

        def checkpoint(step: int) -> None:
            own = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())  # FSDP2: this rank's shard
            finite = all(bool(torch.isfinite(t).all()) for t in own)
            if distributed.any_rank(not finite):
                raise UserError(f"The weights are not finite after step {step}; no checkpoint was saved, so the last one "
                                "is still good. Lower optim.lr or update.max_grad_norm and resume from it.")
            weights, optim_state = distributed.full_state(accelerator, model, optimizer)  # every rank takes part
            if main:
                state = {"step": step, "drawn": sampler.drawn, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                         "rng": torch.get_rng_state(), "world_size": distributed.size()}
                save_checkpoint(run, step, accelerator.unwrap_model(model), tokenizer, state, cfg.train.save_total_limit,
                                state_dict=weights)
            distributed.barrier()  # no rank goes on (or exits) before the checkpoint is complete

        def held_out(step: int, sampled: bool) -> dict[str, dict[str, Any]]:
            with distributed.full_weights(model):  # ranks evaluate different prompt counts: no per-forward collectives
                return evaluate_all(backend, tokenizer, eval_sets, cfg, stages.reward_funcs, sampled, step)

        start_file = run / "eval_start.json"  # the starting metrics, kept for eval.json across resumes
        if start == 0:
            first_eval = held_out(0, True)
            log.log({"step": 0, **eval_row(cfg, first_eval)})
            if main:
                start_file.write_text(json.dumps(first_eval))
        else:
            first_eval = json.loads(start_file.read_text()) if start_file.exists() else None
        bar = progress.add_task("RL", total=cfg.train.steps, completed=start)
        watch = CollapseWatch(cfg.train.get("collapse_drop", 0.2), cfg.train.get("collapse_window", 10),
                              cfg.train.get("collapse_clip", 0.05))
        nonfinite = 0  # consecutive steps whose every optimizer step was skipped for a NaN/inf gradient
        with GracefulStop(run / STOP_FILE if main else None) as stop:  # rank 0 looks for the file; any_rank tells all
            for step in range(start + 1, cfg.train.steps + 1):
                times: dict[str, float] = {}
                t = time.perf_counter()
                offset, batch = distributed.shard([train_set[i] for i in sampler.take(prompts_per_step)])
                ctx.step = step
                with distributed.full_weights(model):  # generation and probe chunks differ per rank
                    backend.wake()  # a colocated engine takes its memory back for sampling (and MC values)
                    seeds = row_seeds(cfg.seed, "train", step, range(offset * G, (offset + len(batch)) * G))
                    ro = stages.rollout(backend, tokenizer, batch, seeds=seeds)
                    times["rollout"], t = time.perf_counter() - t, time.perf_counter()
                    ver = run_verify(ro.texts, ro.samples, stages.reward_funcs, cfg.verify.budget_s)
                    times["verify"], t = time.perf_counter() - t, time.perf_counter()
                    seg = run_segment(ro, stages.segment, pieces, stages.marker)
                    times["segment"], t = time.perf_counter() - t, time.perf_counter()
                    credit = stages.redistribute(ro, ver, seg, ctx)
                    times["redistribute"], t = time.perf_counter() - t, time.perf_counter()
                backend.sleep()  # ... and gives it to the gradient passes
                upd = update_policy(model, ro, credit, cfg=cfg["update"], temperature=cfg.rollout.temperature,
                                    max_completion_length=cfg.rollout.max_new_tokens, optimizer=optimizer,
                                    scheduler=scheduler, accelerator=accelerator, ref_model=ref_model)
                backend.sync(accelerator.unwrap_model(model))  # the next samples come from the new weights
                critic.after_step(step)
                times["update"] = time.perf_counter() - t
                records = distributed.gather_step(ro, ver, seg, credit)  # the whole batch's, for metrics and samples
                row = {"step": step, **global_metrics(records, upd, times, G)}
                warning = watch.update(step, row)
                if warning:
                    note(warning)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                    row.update(eval_row(cfg, held_out(step, False)))
                log.log(row)
                if step % cfg.train.log_every == 0 or step == 1:
                    log.samples(step, sample_rows(*records[:3], cfg.train.samples_per_log))
                nonfinite = nonfinite + 1 if upd.get("skipped_nonfinite", 0) == 1 else 0
                if nonfinite >= cfg.train.max_nonfinite_steps:
                    raise UserError(f"{nonfinite} steps in a row had non-finite gradients (NaN or inf) and were skipped "
                                    f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); the weights are the last "
                                    "finite ones. Lower optim.lr or update.max_grad_norm, and resume from the last checkpoint.")
                stopping = distributed.any_rank(stop.requested is not None)  # a request that reached one rank stops all
                if stopping or (cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps):
                    checkpoint(step)
                progress.update(bar, advance=1, description=f"RL reward {row['reward/mean']:.2f} acc {row['accuracy']:.2f} "
                                                          f"{row['time/step_s']:.2f}s/step")
                if stopping and step < cfg.train.steps:
                    if main:
                        (run / STOP_FILE).unlink(missing_ok=True)  # served: a resumed run does not stop again
                    console.print(f"[yellow]Stopped after step {step}; continue with: rredcot train resume=true run_dir={run}")
                    log.close()
                    raise KeyboardInterrupt(stop.requested or "a stop request on another rank")
        checkpoint(cfg.train.steps)
        final = held_out(cfg.train.steps, True)
        if main:
            (run / STOP_FILE).unlink(missing_ok=True)  # a request that came too late to matter
        log.log({"step": cfg.train.steps, **eval_row(cfg, final, ("accuracy", "pass@1"))})
        log.close()
    primary = cfg.eval.split
    result = {"start": first_eval and first_eval[primary], "final": final[primary], "steps": cfg.train.steps, "split": primary,
              "splits": {s: {"start": first_eval and first_eval[s], "final": final[s]} for s in final}}
    if main:
        (run / "eval.json").write_text(json.dumps(result, indent=2))
        console.print(summary_table(run, result))
    return run
