"""The small typed records that travel between stages.

Shapes: N = completions in a generation batch (prompts x group_size), T = max completion length,
P = max prompt length. Every tensor lives on the policy's device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


@dataclass(frozen=True)
class Sample:
    """One problem: the prompt text the model sees and the gold answer the verifier checks."""

    prompt: str
    gold: str
    meta: dict[str, Any] = field(default_factory=dict)


class Score(NamedTuple):
    """A verifier's verdict on one completion: the reward (None: undefined) and the extraction rule that fired."""

    reward: float | None
    extractor: str


@dataclass
class Rollout:
    """Output of the rollout stage for N completions (G consecutive rows share a prompt)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded prompt tokens
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] sampled tokens, pad after EOS
    completion_mask: torch.Tensor  # [N, T] 1 up to and including EOS
    logprobs: torch.Tensor  # [N, T] log-prob of each sampled token (temperature-scaled logits)
    entropies: torch.Tensor  # [N, T] entropy of the sampling distribution at each step
    truncated: torch.Tensor  # [N] bool, True when no EOS within max_new_tokens
    texts: list[str]  # N decoded completions (special tokens kept out)
    samples: list[Sample]  # N samples, each repeated group_size times
    group_size: int
    sampler_logprobs: torch.Tensor | None = None  # [N, T] an external sampler's own log-probs (rollout=vllm), else None
    kv: list[RolloutKV] | None = None  # the sampler's KV caches, kept for the probes if asked (the trainer drops them)

    @property
    def lengths(self) -> torch.Tensor:
        """[N] completion tokens per row (including EOS)."""
        return self.completion_mask.sum(-1)


@dataclass(frozen=True)
class RolloutKV:
    """The KV cache rollout=sample's sampler filled for rows lo .. lo + len(starts) - 1 of a Rollout: answer-forcing
    probes attend to it instead of forwarding the traces again. Row i's trace position j (its prompt without the
    left padding, then its completion) is cache column starts[i] + j, for j < held[i]: the cache holds every token
    the sampler fed, which is all but the last sampled one."""

    lo: int
    cache: Any  # transformers DynamicCache: [rows, kv heads, columns, head dim] per layer
    starts: list[int]
    held: list[int]
    model: Any  # the model that filled it: another one (a lagged critic) cannot read it


@dataclass
class Verified:
    """Output of the verify stage."""

    rewards: torch.Tensor  # [N] weighted total; NaN where undefined (e.g. unparseable gold)
    per_func: dict[str, torch.Tensor]  # name -> [N] raw reward of each reward function
    correct: torch.Tensor  # [N] bool, the accuracy reward fired
    extractor: list[str]  # N names of the answer extractor that fired ("none" if nothing parsed)


@dataclass
class Segmented:
    """Output of the segment stage: per row, prefix lengths 0 = b_0 < b_1 < ... < b_K <= T."""

    boundaries: list[list[int]]  # N lists of completion-token offsets
    think_end: list[int | None]  # N offsets of the end-of-thinking marker (None if absent)


@dataclass
class Credit:
    """Output of the redistribute stage: what the update multiplies into the surrogate."""

    advantages: torch.Tensor  # [N, T] token advantages (0 on padding)
    valid: torch.Tensor  # [N] bool, False for rows to skip (undefined reward)
    stats: dict[str, float] = field(default_factory=dict)
    segment_credit: list[torch.Tensor] | None = None  # N x [K+1]: each segment's credit, then the correction
    values: list[torch.Tensor] | None = None  # N x [K+1]: V_hat at b_0..b_K (value-based estimators only)
