"""Benchmark 3: RREDCoT's values against Monte Carlo values at the same boundaries.

    python -m benchmarks.montecarlo [--quick]

The warm-started built-in model samples one batch (8 prompts x 8 completions; --quick: 2 x 4, debug=fast's
smaller warm start) and the hybrid segmenter cuts it; then on the same traces and boundaries the `rredcot`
estimator (answer forcing: probe
tokens only, on the rollout's KV cache) and the `mc` estimator with M = 4, 8, 16 continuations per boundary
(VinePPO-style, sampled with the rollout's settings) each compute their values. Reported per estimator:
tokens forwarded (probe tokens; MC: the prefixes its continuations start from), tokens generated, seconds
(median of interleaved repeats), and MC's seconds over RREDCoT's.
"""

from __future__ import annotations

from benchmarks.common import Report, cli, interleaved_medians


def _batch(prompts: int, group: int, overrides: list[str]):
    """(ro, ver, seg, ctx-maker, cfg) of one sampled, verified and segmented batch of the built-in task."""
    import torch
    from transformers.utils import logging as hf_logging

    from rredcot.assemble import build_stages, policy_context
    from rredcot.compose import load_config
    from rredcot.registry import get
    from rredcot.stages.segment import PieceDecoder, run_segment
    from rredcot.stages.verify import run_verify
    from rredcot.task.warmstart import load_policy

    hf_logging.disable_progress_bar()
    cfg = load_config(["logging.progress=false", *overrides, f"rollout.group_size={group}"])
    model, tok = load_policy(cfg)
    model.eval()
    stages = build_stages(cfg)
    samples = get("task", cfg.task.name)(cfg.task, "test", tok)[:prompts]
    torch.manual_seed(0)
    ro = stages.rollout(model, tok, samples)
    ver = run_verify(ro.texts, ro.samples, stages.reward_funcs)
    seg = run_segment(ro, stages.segment, PieceDecoder(tok), stages.marker)
    return ro, ver, seg, lambda: policy_context(cfg, model, tok, stages, None, 1), cfg, tok


class Counting:
    """Wraps PolicyContext.generate to count the tokens Monte Carlo forwards (prefixes) and generates."""

    def __init__(self, generate, tok):
        self.generate, self.tok, self.prefix, self.generated = generate, tok, 0, 0

    def __call__(self, prefixes, n, budgets):
        texts = self.generate(prefixes, n, budgets)
        self.prefix += n * sum(len(p) for p in prefixes)
        self.generated += sum(len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"])
        return texts


def run(quick: bool = False) -> Report:
    from rredcot.registry import get

    prompts, group, ms, repeats = (2, 4, (4,), 1) if quick else (8, 8, (4, 8, 16), 2)
    ro, ver, seg, make_ctx, cfg, tok = _batch(prompts, group, ["debug=fast"] if quick else [])
    kv = ro.kv
    rredcot = get("redistribute", "rredcot")
    mc = get("redistribute", "mc")

    def forced():
        ro.kv = kv  # the trainer drops the cache after the stage: keep it for every repeat
        return rredcot(ro, ver, seg, make_ctx(), group_size=group)

    fns = {"rredcot": forced}
    counts = {}
    for m in ms:
        ctx = make_ctx()
        counts[m] = ctx.generate = Counting(ctx.generate, tok)
        fns[f"mc M={m}"] = lambda ctx=ctx, m=m: mc(ro, ver, seg, ctx, group_size=group, samples=m)
    probe_tokens = forced().stats["credit/probe_tokens_per_trace"] * len(ro.texts)
    med = interleaved_medians(fns, repeats=repeats, warmup=0)  # forced() above warmed the probe path up
    runs = repeats  # each MC estimator ran once per repeat
    rep = Report("RREDCoT against Monte Carlo values (built-in model, same boundaries)" + (" [quick]" if quick else ""))
    boundaries = sum(len(b) for b in seg.boundaries)
    rep.rows.append(
        {"estimator": "rredcot", "forwarded tokens": probe_tokens, "generated tokens": 0, "seconds": med["rredcot"]}
    )
    for m in ms:
        c = counts[m]
        rep.rows.append(
            {
                "estimator": f"mc M={m}",
                "forwarded tokens": c.prefix / runs,
                "generated tokens": c.generated / runs,
                "seconds": med[f"mc M={m}"],
                "x rredcot": med[f"mc M={m}"] / med["rredcot"],
            }
        )
    rep.results["mc_over_rredcot_seconds"] = {str(m): med[f"mc M={m}"] / med["rredcot"] for m in ms}
    rep.notes.append(
        f"{len(ro.texts)} traces, {boundaries} boundaries; MC at M={ms[0]} costs "
        f"{rep.results['mc_over_rredcot_seconds'][str(ms[0])]:.0f}x RREDCoT's seconds (target >= 50x)"
    )
    return rep


if __name__ == "__main__":
    cli(run)
