"""The Trainer's setup, everything before step 1: the launch and its checks, the run directory, the starting
policy and the data, the resume state, the reference model, the optimizer and accelerate's prepare, and the
loop's state (prompt order, rollout backend, critic, collapse watch). The steps themselves: trainer.py."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM

from rredcot import collectives, lora, sharding
from rredcot.assemble import PromptSampler, build_stages
from rredcot.checks import check_config
from rredcot.critic import Critic
from rredcot.errors import UserError
from rredcot.optim import build_optimizer, compile_layers, enable_checkpointing
from rredcot.runlock import RunLock
from rredcot.runlog import MetricsLog, check_run_dir, default_run_dir, init_run_dir, load_state
from rredcot.stages.reward_funcs import try_callables
from rredcot.stages.segment import PieceDecoder
from rredcot.stages.update import Learner
from rredcot.stages.verify import check_golds
from rredcot.startup import prompt_limit, startup_notes, task_sets
from rredcot.task.model import trusts_remote_code
from rredcot.task.warmstart import load_policy
from rredcot.ui import quiet_unless
from rredcot.watch import CollapseWatch


class Setup:
    """Builds what the Trainer's steps use (self.cfg and self.overrides are set by the Trainer)."""

    def setup(self, progress) -> None:
        """Checks, data, model, resume state and optimizer, then the run directory's files: a config, data,
        model or resume error leaves nothing behind (the files are written only once all of them loaded)."""
        if self.accelerator is None:  # fit() launches before it opens the progress display
            self._setup_launch()
        self.stages = build_stages(self.cfg)
        self._setup_policy(progress)
        self._setup_optimizer()
        self._setup_run_files()
        self._setup_loop(progress)

    def _setup_launch(self) -> None:
        cfg = self.cfg
        self.accelerator = sharding.make_accelerator(cfg.device)
        self.main = collectives.is_main()
        quiet_unless(self.main)
        cfg.world_size = check_config(
            cfg, world_size=collectives.size(), will_shard=sharding.will_shard(self.accelerator)
        )
        if not cfg.run_dir:
            cfg.run_dir = collectives.broadcast(str(default_run_dir()))  # one name, chosen by rank 0
        self._lock_run_dir(Path(cfg.run_dir))
        self.run, self.ckpt = check_run_dir(cfg)
        set_seed(cfg.seed)

    def _lock_run_dir(self, run: Path) -> None:
        """Rank 0 takes the run directory's lock (one writer at a time); every rank refuses if it is held."""
        self.lock, refused = RunLock(run), None
        if self.main:
            try:
                self.lock.acquire()
            except UserError as e:
                refused = str(e)
        refused = collectives.broadcast(refused)
        if refused:
            raise UserError(refused)

    def release_run_dir(self) -> None:
        """Give the lock back (an error before the run began also removes the directory the lock made)."""
        if getattr(self, "lock", None) is not None:
            self.lock.release()

    def _setup_policy(self, progress) -> None:
        """The starting policy, the data, the resume state and the reference model."""
        cfg, ckpt = self.cfg, self.ckpt
        with collectives.main_first():  # rank 0 builds the warm-start cache and the data caches; the others reuse them
            model, self.tokenizer = load_policy(cfg, progress)
            set_seed(cfg.seed)  # again: training the warm start (vs loading it cached) must not change the RL run
            self.train_set, self.eval_sets = task_sets(cfg, self.tokenizer, prompt_limit(cfg, model))
        check_golds(
            {"train": self.train_set, **self.eval_sets},
            self.stages.reward_funcs.verifier,
            cfg.task.get("max_bad_fraction", 0.01),
        )
        try_callables(self.stages.reward_funcs.callables, self.train_set[:4])  # before the run directory is written
        startup_notes(cfg, self.tokenizer)
        if lora.enabled(cfg):  # the base weights stay; the adapter is new, or the checkpoint's
            model = lora.wrap(model, cfg, resume_from=ckpt)
        self.start, self.resume_state = 0, None
        if ckpt is not None:
            self.resume_state = load_state(ckpt, mmap=False)
            self.start = self.resume_state["step"]
        beta = cfg["update"].beta
        if lora.enabled(cfg):
            self.ref_model = lora.AdapterOff(model) if beta > 0 else None
        else:
            self.ref_model = (
                copy.deepcopy(model).requires_grad_(False).eval() if beta > 0 else None
            )  # the starting policy
            if ckpt is not None:
                model = AutoModelForCausalLM.from_pretrained(
                    ckpt,
                    dtype=next(model.parameters()).dtype,
                    trust_remote_code=trusts_remote_code(cfg),
                )
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
            sharding.load_optimizer(self.model, optimizer, self.resume_state["optimizer"], self.ckpt)
            scheduler.load_state_dict(self.resume_state["scheduler"])
            torch.set_rng_state(self.resume_state["rng"])
        self.learner = Learner(self.model, optimizer, scheduler, self.accelerator, self.ref_model)

    def _setup_run_files(self) -> None:
        """The run directory's files, written only now: every check (config, data, model, the resume state and
        the optimizer's) has passed, so an error leaves nothing behind and a resume that fails changes nothing."""
        if self.main:
            self.lock.began = True
            init_run_dir(self.run, self.cfg, self.overrides, self.ckpt)
        self.log = MetricsLog(self.run, self.cfg, enabled=self.main)
        if self.ckpt is not None:
            self.log.keep_until(self.start, unfinished=not (self.run / "eval.json").exists())

    def _setup_loop(self, progress) -> None:
        cfg, policy = self.cfg, self.accelerator.unwrap_model(self.model)
        drawn = self.resume_state["drawn"] if self.resume_state is not None else 0
        self.sampler = PromptSampler(len(self.train_set), cfg.seed, drawn)
        self.pieces = PieceDecoder(self.tokenizer)
        self.backend = self.stages.make_backend(policy, self.tokenizer)
        self.critic = Critic(policy, cfg.train.get("critic_lag", 0), self.start)
        self.watch = CollapseWatch(
            cfg.train.get("collapse_drop", 0.2),
            cfg.train.get("collapse_window", 10),
            cfg.train.get("collapse_clip", 0.05),
        )
        self.progress = progress
        self.bar = progress.add_task("RL", total=cfg.train.steps, completed=self.start)
