"""What a run is made of, assembled from its config: the registry entries it chose with their options bound
(Stages), what the value estimators see at a step (policy_context, with keyed Monte Carlo continuations),
and the order prompts are drawn in (PromptSampler). The trainer and `rredcot credit` both build from here."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from rredcot.registry import entry, get
from rredcot.sections import rollout_options, stage_options
from rredcot.stages.context import PolicyContext
from rredcot.stages.montecarlo import sample_from_ids
from rredcot.stages.rollout import sample_rollout
from rredcot.stages.sampling import prefix_seeds
from rredcot.stages.segment import think_marker
from rredcot.stages.verify import RewardFuncs, build_reward_funcs


@dataclass
class Stages:
    """The registry entries the config chose, with their options bound."""

    rollout: Callable  # (backend, tokenizer, samples, seeds=...) -> Rollout
    make_backend: Callable  # (model, tokenizer) -> the RolloutBackend that rollout.name chose
    reward_funcs: RewardFuncs
    segment: Callable
    redistribute: Callable  # (Rollout, Verified, Segmented, PolicyContext) -> Credit
    marker: str | None  # the model's end-of-thinking marker (model.think_end); None: it does not think


def build_stages(cfg: DictConfig) -> Stages:
    sampling, backend = rollout_options(cfg.rollout)
    reads_kv = entry("redistribute", cfg.redistribute.name).reads_kv  # the probes read the sampler's KV cache
    return Stages(
        rollout=partial(sample_rollout, **sampling, keep_kv=reads_kv),
        make_backend=partial(get("rollout", cfg.rollout.name), **backend),
        reward_funcs=build_reward_funcs(cfg.verify),
        segment=partial(get("segment", cfg.segment.name), **stage_options(cfg.segment)),
        redistribute=partial(
            get("redistribute", cfg.redistribute.name),
            group_size=cfg.rollout.group_size,
            **stage_options(cfg.redistribute),
        ),
        marker=think_marker(cfg),
    )


@dataclass(frozen=True)
class Continuations:
    """Monte Carlo continuations for the value estimators, from the rollout backend (or the model), keyed by
    (seed, step, prefix tokens) so that they are the same at any world size."""

    backend: Any
    tokenizer: Any
    rollout: DictConfig  # cfg.rollout: temperature, top_p, top_k
    seed: int
    step: int

    def __call__(self, prefixes: list[list[int]], n: int, budgets: list[int]) -> list[str]:
        ro = self.rollout
        return sample_from_ids(
            self.backend,
            self.tokenizer,
            prefixes,
            n,
            budgets,
            temperature=ro.temperature,
            top_p=ro.top_p,
            top_k=ro.top_k,
            seeds=prefix_seeds(self.seed, self.step, prefixes, n),
        )


def policy_context(cfg: DictConfig, model, tokenizer, stages: Stages, backend=None, step: int = 0) -> PolicyContext:
    """What the value estimators see at RL step `step`: the live policy (or the critic), the task's verifier and
    forcing texts; Monte Carlo continuations come from the rollout backend (the model's own when none is given)."""
    ro = cfg.rollout
    return PolicyContext(
        model=model,
        tokenizer=tokenizer,
        verifier=stages.reward_funcs.verifier,
        force_text=cfg.task.get("forcing_text"),
        closing_text=cfg.task.get("closing_text") or "",
        generate=Continuations(backend or model, tokenizer, ro, cfg.seed, step),
        temperature=ro.temperature,
        max_new_tokens=ro.max_new_tokens,
    )


class PromptSampler:
    """Draws prompt indices epoch by epoch, each epoch a seeded permutation; `drawn` is its whole state."""

    def __init__(self, n: int, seed: int, drawn: int = 0):
        self.n, self.seed, self.drawn, self._perm = n, seed, drawn, (None, None)

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, pos = divmod(self.drawn, self.n)
            if self._perm[0] != epoch:
                gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                self._perm = (epoch, torch.randperm(self.n, generator=gen))
            out.append(int(self._perm[1][pos]))
            self.drawn += 1
        return out
