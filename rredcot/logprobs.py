"""Per-token log-probs of completions under a model: the one forward the update, the old policy and
the reference model all use (logits divided by the sampling temperature, as TRL does)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without materialising the full [.., V] log-prob tensor.

    logits [N, T, V], index [N, T] -> [N, T]. Example: logits [[0, log 3]] and index [1] give
    log(3 / (1 + 3)) = -0.2877.
    """
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # [N, T]
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p log p over the last axis: [..., V] -> [...]."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: mask [N, L] -> [N, L], 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of every completion token: prompt [n, P] + completion [n, T] -> ([n, T], [n, T] or None).

    Gradients flow when called outside no_grad (the update); the old/reference passes wrap it.
    """
    ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [n, P+T]
    mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [n, P+T]
    T = completion_ids.shape[1]
    # logits_to_keep=T+1: only the positions that predict completion tokens are projected to the vocab.
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=T + 1, use_cache=False
    ).logits  # no KV cache to build (and none is possible under gradient checkpointing)
    logits = logits[:, :-1].float() / temperature  # [n, T, V]; position t predicts completion token t
    logp = selective_log_softmax(logits, completion_ids)
    ent = entropy_from_logits(logits.detach()) if with_entropy else None
    return logp, ent


def no_grad_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float,
    batch: int,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """completion_logprobs without gradients, `batch` rows per forward: ([n, T], [n, T] or None).
    The update's old and reference log-probs and the re-scoring of an external sampler's tokens use it."""
    lps, ents = [], []
    with torch.no_grad():
        for lo in range(0, completion_ids.shape[0], batch):
            sl = slice(lo, lo + batch)
            lp, ent = completion_logprobs(
                model,
                prompt_ids[sl],
                prompt_mask[sl],
                completion_ids[sl],
                completion_mask[sl],
                temperature,
                with_entropy,
            )
            lps.append(lp)
            ents.append(ent)
    return torch.cat(lps), (torch.cat(ents) if with_entropy else None)
