"""Held-out evaluation: greedy accuracy, pass@1 (mean over n samples), unbiased pass@k, completion
length and the truncated fraction."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig

from rredcot import collectives
from rredcot.runlog import eval_prefix
from rredcot.sections import rollout_options
from rredcot.stages.rollout import as_backend, sample_rollout
from rredcot.stages.sampling import row_seeds
from rredcot.stages.segment import think_marker
from rredcot.stages.verify import RewardFuncs, run_verify
from rredcot.types import Sample


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Example: n=4, c=1, k=2 -> 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5.
    """
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _rollout(backend, tokenizer, samples, cfg: Any, n: int, greedy: bool, seeds: list[int] | None = None):
    """The training rollout's sampling settings, except n samples, eval temperature, greedy; nothing re-scored."""
    opts = {**rollout_options(cfg.rollout)[0], "group_size": n, "temperature": cfg.eval.temperature, "greedy": greedy}
    return sample_rollout(backend, tokenizer, samples, score=False, seeds=seeds, **opts)


def unclosed(texts: list[str], marker: str | None) -> float | None:
    """Fraction of completions that never wrote the end-of-thinking marker (truncated mid-thought): their
    answers come from whatever the verifier finds. None for a model that does not think (no marker)."""
    return sum(marker not in t for t in texts) / max(len(texts), 1) if marker else None


def evaluate(
    backend, tokenizer, samples: list[Sample], cfg: Any, reward_funcs: RewardFuncs, sampled: bool = True, step: int = 0
) -> dict[str, Any]:
    """Metrics on `samples` from a rollout backend (or a model: the reference backend); with
    sampled=False only the greedy ones (cheap, for periodic evals).

    With several processes each evaluates its block of the prompts and the per-prompt results are
    gathered (every rank returns the same metrics). Sampled completions are keyed by (seed, step,
    prompt, sample), on a forked RNG: how often, where and on how many processes a run evaluates never
    changes its training or its numbers."""
    backend = as_backend(backend, tokenizer)
    device = next(backend.model.parameters()).device
    offset, mine = collectives.shard(samples, strict=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        records = _records(backend, tokenizer, mine, offset, cfg, reward_funcs, sampled, step) if mine else []
    return summarize([r for part in collectives.gather(records) for r in part], cfg, sampled)


def _records(
    backend,
    tokenizer,
    samples: list[Sample],
    offset: int,
    cfg: Any,
    reward_funcs: RewardFuncs,
    sampled: bool,
    step: int,
) -> list[dict[str, Any]]:
    """One plain record per prompt (what summarize needs): greedy text, correctness, length; sampled ones."""
    reward_funcs = reward_funcs.judged()  # only `correct` is read: no reward function is called on held-out rows
    greedy = _rollout(backend, tokenizer, samples, cfg, 1, greedy=True)
    v = run_verify(greedy.texts, greedy.samples, reward_funcs, cfg.verify.budget_s)
    recs = [
        {
            "prompt": s.prompt,
            "gold": s.gold,
            "completion": t,
            "correct": bool(ok),
            "length": int(n),
            "truncated": bool(tr),
        }
        for s, t, ok, n, tr in zip(
            samples, greedy.texts, v.correct.tolist(), greedy.lengths.tolist(), greedy.truncated.tolist()
        )
    ]
    if sampled:
        n = cfg.eval.n_samples
        seeds = row_seeds(cfg.seed, "eval", step, range(offset * n, (offset + len(samples)) * n))
        ro = _rollout(backend, tokenizer, samples, cfg, n, greedy=False, seeds=seeds)
        correct = run_verify(ro.texts, ro.samples, reward_funcs, cfg.verify.budget_s).correct.view(len(samples), n)
        lengths, truncated = ro.lengths.view(len(samples), n).tolist(), ro.truncated.view(len(samples), n).tolist()
        for i, rec in enumerate(recs):
            rec.update(
                n_correct=int(correct[i].sum()),
                s_lengths=lengths[i],
                s_truncated=truncated[i],
                s_texts=ro.texts[i * n : (i + 1) * n],
            )
    return recs


def summarize(recs: list[dict[str, Any]], cfg: Any, sampled: bool) -> dict[str, Any]:
    """The metrics of per-prompt records (all ranks' records, in prompt order)."""
    marker = think_marker(cfg)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    out: dict[str, Any] = {
        "accuracy": mean([r["correct"] for r in recs]),
        "mean_length": mean([r["length"] for r in recs]),
        "truncated_frac": mean([r["truncated"] for r in recs]),
        "unclosed_think_frac": unclosed([r["completion"] for r in recs], marker),
        "n_prompts": len(recs),
    }
    if sampled:
        n = cfg.eval.n_samples
        out["pass@1"] = sum(r["n_correct"] for r in recs) / max(n * len(recs), 1)
        for k in cfg.eval.ks:
            out[f"pass@{k}"] = mean([pass_at_k(n, r["n_correct"], k) for r in recs])
        out["sampled_mean_length"] = mean([x for r in recs for x in r["s_lengths"]])
        out["sampled_truncated_frac"] = mean([x for r in recs for x in r["s_truncated"]])
        out["sampled_unclosed_think_frac"] = unclosed([t for r in recs for t in r["s_texts"]], marker)
        out["examples"] = [{k: r[k] for k in ("prompt", "gold", "completion", "correct")} for r in recs[:8]]
    return out


def evaluate_all(
    backend,
    tokenizer,
    sets: dict[str, list[Sample]],
    cfg: DictConfig,
    reward_funcs: RewardFuncs,
    sampled: bool = True,
    step: int = 0,
) -> dict[str, dict[str, Any]]:
    return {
        split: evaluate(backend, tokenizer, samples, cfg, reward_funcs, sampled, step)
        for split, samples in sets.items()
    }


def eval_row(
    cfg: DictConfig, results: dict[str, dict[str, Any]], keys: tuple[str, ...] = ("accuracy",)
) -> dict[str, float]:
    """{"eval/accuracy": .., "eval_test/accuracy": ..}: the metrics.jsonl keys of each split's results."""
    return {f"{eval_prefix(split, cfg.eval.split)}/{k}": r[k] for split, r in results.items() for k in keys}
