"""Held-out evaluation: greedy accuracy, pass@1 (mean over n samples), unbiased pass@k, completion
length and the truncated fraction."""
from __future__ import annotations

import math
from typing import Any

import torch

from rredcot.config import rollout_options
from rredcot.stages.rollout import as_backend, sample_rollout
from rredcot.stages.verify import run_verify
from rredcot.stages.segment import think_marker
from rredcot.types import Sample


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Example: n=4, c=1, k=2 -> 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5.
    """
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _rollout(backend, tokenizer, samples, cfg: Any, n: int, greedy: bool):
    """The training rollout's sampling settings, except n samples, eval temperature, greedy; nothing re-scored."""
    opts = {**rollout_options(cfg.rollout)[0], "group_size": n, "temperature": cfg.eval.temperature, "greedy": greedy}
    return sample_rollout(backend, tokenizer, samples, score=False, **opts)


def unclosed(texts: list[str], marker: str | None) -> float | None:
    """Fraction of completions that never wrote the end-of-thinking marker (truncated mid-thought): their
    answers come from whatever the verifier finds. None for a model that does not think (no marker)."""
    return sum(marker not in t for t in texts) / max(len(texts), 1) if marker else None


def evaluate(backend, tokenizer, samples: list[Sample], cfg: Any, reward_funcs: dict, sampled: bool = True) -> dict[str, Any]:
    """Metrics on `samples` from a rollout backend (or a model: the reference backend); with
    sampled=False only the greedy ones (cheap, for periodic evals).

    Sampling runs on a forked RNG: how often and on what a run evaluates never changes its training
    (a run evaluated on dev and the same run evaluated on test train the same policy)."""
    backend = as_backend(backend, tokenizer)
    device = next(backend.model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _evaluate(backend, tokenizer, samples, cfg, reward_funcs, sampled)


def _evaluate(backend, tokenizer, samples: list[Sample], cfg: Any, reward_funcs: dict, sampled: bool) -> dict[str, Any]:
    marker = think_marker(cfg)
    greedy = _rollout(backend, tokenizer, samples, cfg, 1, greedy=True)
    v = run_verify(greedy.texts, greedy.samples, reward_funcs, cfg.verify.budget_s)
    out: dict[str, Any] = {
        "accuracy": float(v.correct.float().mean()),
        "mean_length": float(greedy.lengths.float().mean()),
        "truncated_frac": float(greedy.truncated.float().mean()),
        "unclosed_think_frac": unclosed(greedy.texts, marker),
        "n_prompts": len(samples),
    }
    if sampled:
        n = cfg.eval.n_samples
        ro = _rollout(backend, tokenizer, samples, cfg, n, greedy=False)
        correct = run_verify(ro.texts, ro.samples, reward_funcs, cfg.verify.budget_s).correct.view(len(samples), n)  # [prompts, n]
        c = correct.sum(1).tolist()
        out["pass@1"] = float(correct.float().mean())
        for k in cfg.eval.ks:
            out[f"pass@{k}"] = sum(pass_at_k(n, ci, k) for ci in c) / len(c)
        out["sampled_mean_length"] = float(ro.lengths.float().mean())
        out["sampled_truncated_frac"] = float(ro.truncated.float().mean())
        out["sampled_unclosed_think_frac"] = unclosed(ro.texts, marker)
        out["examples"] = [{"prompt": s.prompt, "gold": s.gold, "completion": t, "correct": bool(ok)}
                           for s, t, ok in list(zip(greedy.samples, greedy.texts, v.correct.tolist()))[:8]]
    return out
