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
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from rredcot import lora
from rredcot.config import rollout_options, stage_options
from rredcot.critic import Critic
from rredcot.errors import UserError
from rredcot.evaluate import evaluate
from rredcot.registry import get
from rredcot.runlog import MetricsLog, check_run_dir, eval_prefix, init_run_dir, save_checkpoint
from rredcot.stages.rollout import sample_from_ids, sample_rollout
from rredcot.stages.segment import PieceDecoder, run_segment, segment_lengths, think_marker
from rredcot.stages.values import PolicyContext
from rredcot.stages.update import (advantage_by_group, build_optimizer, compile_layers, enable_checkpointing, frac_zero_std,
                                   update_policy)
from rredcot.stages.verify import build_reward_funcs, check_golds, run_verify
from rredcot.startup import prompt_limit, startup_notes, task_sets
from rredcot.stopping import GracefulStop
from rredcot.task.warmstart import load_policy
from rredcot.types import Sample
from rredcot.ui import console, make_progress, note, summary_table
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
                               top_p=ro.top_p, top_k=ro.top_k)

    return PolicyContext(model=model, tokenizer=tokenizer, verifier=stages.reward_funcs["accuracy"][0],
                         force_text=cfg.task.get("forcing_text"), closing_text=cfg.task.get("closing_text") or "",
                         generate=generate, temperature=ro.temperature, max_new_tokens=ro.max_new_tokens)


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


def step_metrics(ro, ver, seg, credit, upd: dict, times: dict[str, float], group_size: int) -> dict[str, Any]:
    """What a user watches: reward, accuracy, lengths, entropy, credit spread, losses, stage times."""
    lengths = ro.lengths.float()
    mask = ro.completion_mask.bool()
    valid = ~torch.isnan(ver.rewards)
    out = {
        "reward/mean": float(ver.rewards[valid].mean()) if valid.any() else float("nan"),
        "reward/std": float(ver.rewards[valid].std()) if valid.sum() > 1 else 0.0,
        "accuracy": float(ver.correct.float().mean()),
        "frac_reward_zero_std": frac_zero_std(torch.nan_to_num(ver.rewards, nan=-1.0), group_size),
        "frac_reward_undefined": float((~valid).float().mean()),
        "completion/mean_length": float(lengths.mean()),
        "completion/max_length": float(lengths.max()),
        "completion/clipped_ratio": float(ro.truncated.float().mean()),
        "entropy": float(ro.entropies[mask].mean()),
        "segments/per_trace": float(segment_lengths(seg).mean()),
        "completion/unclosed_think_frac": sum(e is None for e in seg.think_end) / max(len(seg.think_end), 1),
        "advantage/token_std": float(credit.advantages[mask].std()) if mask.sum() > 1 else 0.0,
        **advantage_by_group(credit.advantages, ro.completion_mask * credit.valid.to(mask.device)[:, None], ver.correct,
                             group_size),
        **{f"reward/{k}/mean": float(torch.nanmean(v)) for k, v in ver.per_func.items()},
        **{f"extractor/{e}": ver.extractor.count(e) / len(ver.extractor) for e in sorted(set(ver.extractor))},
        **credit.stats, **upd,
    }
    out.update({f"time/{k}_s": v for k, v in times.items()})
    out["time/step_s"] = sum(times.values())
    out["tokens/s"] = float(lengths.sum()) / max(out["time/step_s"], 1e-9)
    out["memory/peak_mb"] = peak_memory_mb()
    return out


def evaluate_all(backend, tokenizer, sets: dict[str, list[Sample]], cfg: DictConfig, reward_funcs: dict,
                 sampled: bool = True) -> dict[str, dict[str, Any]]:
    return {split: evaluate(backend, tokenizer, samples, cfg, reward_funcs, sampled) for split, samples in sets.items()}


def eval_row(cfg: DictConfig, results: dict[str, dict[str, Any]], keys: tuple[str, ...] = ("accuracy",)) -> dict[str, float]:
    """{"eval/accuracy": .., "eval_test/accuracy": ..}: the metrics.jsonl keys of each split's results."""
    return {f"{eval_prefix(split, cfg.eval.split)}/{k}": r[k] for split, r in results.items() for k in keys}


def peak_memory_mb() -> float:
    """Peak accelerator memory if there is one, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(cfg: DictConfig, overrides: list[str] = ()) -> Path:
    """Run RL training as configured (`overrides`: the command line, saved with the run); returns the run directory."""
    run, ckpt = check_run_dir(cfg)
    set_seed(cfg.seed)
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    stages = build_stages(cfg)
    with make_progress(cfg.logging.progress) as progress:
        model, tokenizer = load_policy(cfg, progress)
        set_seed(cfg.seed)  # again: training the warm start (vs loading it cached) must not change the RL run
        train_set, eval_sets = task_sets(cfg, tokenizer, prompt_limit(cfg, model))
        check_golds({"train": train_set, **eval_sets}, stages.reward_funcs["accuracy"][0], cfg.task.get("max_bad_fraction", 0.01))
        startup_notes(cfg, tokenizer)
        if lora.enabled(cfg):  # the base weights stay; the adapter is new, or the checkpoint's
            model = lora.wrap(model, cfg, resume_from=ckpt)
        init_run_dir(run, cfg, overrides, ckpt)  # only now: a config, data or model error leaves nothing behind
        log = MetricsLog(run, cfg)
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
        model, optimizer = accelerator.prepare(model, optimizer)
        if ref_model is not None and not isinstance(ref_model, lora.AdapterOff):
            ref_model = ref_model.to(accelerator.device)
        if resume_state is not None:
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            torch.set_rng_state(resume_state["rng"])
        sampler = PromptSampler(len(train_set), cfg.seed, drawn)
        pieces = PieceDecoder(tokenizer)
        backend = stages.make_backend(accelerator.unwrap_model(model), tokenizer)
        critic = Critic(accelerator.unwrap_model(model), cfg.train.get("critic_lag", 0), start)
        ctx = policy_context(cfg, critic.model, tokenizer, stages, backend)
        prompts_per_step = cfg.train.generation_batch_size // cfg.rollout.group_size

        def checkpoint(step: int) -> None:
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise UserError(f"The weights are not finite after step {step}; no checkpoint was saved, so the last one "
                                "is still good. Lower optim.lr or update.max_grad_norm and resume from it.")
            state = {"step": step, "drawn": sampler.drawn, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
            save_checkpoint(run, step, accelerator.unwrap_model(model), tokenizer, state, cfg.train.save_total_limit)

        start_file = run / "eval_start.json"  # the starting metrics, kept for eval.json across resumes
        if start == 0:
            first_eval = evaluate_all(backend, tokenizer, eval_sets, cfg, stages.reward_funcs)
            log.log({"step": 0, **eval_row(cfg, first_eval)})
            start_file.write_text(json.dumps(first_eval))
        else:
            first_eval = json.loads(start_file.read_text()) if start_file.exists() else None
        bar = progress.add_task("RL", total=cfg.train.steps, completed=start)
        watch = CollapseWatch(cfg.train.get("collapse_drop", 0.2), cfg.train.get("collapse_window", 10),
                              cfg.train.get("collapse_clip", 0.05))
        nonfinite = 0  # consecutive steps whose every optimizer step was skipped for a NaN/inf gradient
        with GracefulStop() as stop:
            for step in range(start + 1, cfg.train.steps + 1):
                times: dict[str, float] = {}
                t = time.perf_counter()
                batch = [train_set[i] for i in sampler.take(prompts_per_step)]
                backend.wake()  # a colocated engine takes its memory back for sampling (and MC values)
                ro = stages.rollout(backend, tokenizer, batch)
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
                row = {"step": step, **step_metrics(ro, ver, seg, credit, upd, times, cfg.rollout.group_size)}
                warning = watch.update(step, row)
                if warning:
                    note(warning)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                    row.update(eval_row(cfg, evaluate_all(backend, tokenizer, eval_sets, cfg, stages.reward_funcs, sampled=False)))
                log.log(row)
                if step % cfg.train.log_every == 0 or step == 1:
                    log.samples(step, [{"prompt": s.prompt, "gold": s.gold, "completion": txt, "reward": float(r),
                                        "segments": b} for s, txt, r, b in
                                       list(zip(ro.samples, ro.texts, ver.rewards.tolist(), seg.boundaries))[: cfg.train.samples_per_log]])
                nonfinite = nonfinite + 1 if upd.get("skipped_nonfinite", 0) == 1 else 0
                if nonfinite >= cfg.train.max_nonfinite_steps:
                    raise UserError(f"{nonfinite} steps in a row had non-finite gradients (NaN or inf) and were skipped "
                                    f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); the weights are the last "
                                    "finite ones. Lower optim.lr or update.max_grad_norm, and resume from the last checkpoint.")
                if stop.requested or (cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps):
                    checkpoint(step)
                progress.update(bar, advance=1, description=f"RL reward {row['reward/mean']:.2f} acc {row['accuracy']:.2f} "
                                                          f"{row['time/step_s']:.2f}s/step")
                if stop.requested and step < cfg.train.steps:
                    console.print(f"[yellow]Stopped after step {step}; continue with: rredcot train resume=true run_dir={run}")
                    log.close()
                    raise KeyboardInterrupt(stop.requested)
        checkpoint(cfg.train.steps)
        final = evaluate_all(backend, tokenizer, eval_sets, cfg, stages.reward_funcs)
        log.log({"step": cfg.train.steps, **eval_row(cfg, final, ("accuracy", "pass@1"))})
        log.close()
    primary = cfg.eval.split
    result = {"start": first_eval and first_eval[primary], "final": final[primary], "steps": cfg.train.steps, "split": primary,
              "splits": {s: {"start": first_eval and first_eval[s], "final": final[s]} for s in final}}
    (run / "eval.json").write_text(json.dumps(result, indent=2))
    console.print(summary_table(run, result))
    return run
