"""Benchmark: all answer-forcing probes of a batch in one packed forward vs one forward per probe.

    python scripts/bench_probes.py [--traces 32] [--repeats 5]

Prints the median seconds of each path over `repeats` runs, measured in the same process, and their
ratio (the number to quote: absolute times on a shared machine are noise). Uses the built-in model
warm-started (cached) and traces it samples from held-out prompts. The memory of the packed and the
KV-cache paths against trace length is scripts/bench_probe_memory.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rredcot.assemble import build_stages
from rredcot.compose import load_config
from rredcot.registry import get
from rredcot.stages.context import _encode, trace_ids
from rredcot.stages.probes import ProbeItem, probe_logprobs_batch, probe_logprobs_cached, probe_logprobs_reference
from rredcot.stages.segment import PieceDecoder, run_segment
from rredcot.task.warmstart import load_policy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", type=int, default=32)
    ap.add_argument("--answers", type=int, default=3, help="candidate answers per trace")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = load_config(["logging.progress=false"])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tok = load_policy(cfg)
    model.eval()
    stages = build_stages(cfg)
    samples = get("task", cfg.task.name)(cfg.task, "test", tok)[: args.traces // cfg.rollout.group_size]
    torch.manual_seed(0)
    ro = stages.rollout(model, tok, samples)
    seg = run_segment(ro, stages.segment, PieceDecoder(tok), stages.marker)
    force = _encode(tok, cfg.task.forcing_text)
    answers = [_encode(tok, f"{a}{cfg.task.closing_text}") for a in range(10, 10 + args.answers)]
    items = []
    for row in range(len(ro.texts)):
        ids, plen = trace_ids(ro, row)
        items.append(ProbeItem.from_parts(ids, [plen + b for b in seg.boundaries[row]], force, answers))
    probes = sum(len(it.boundaries) * len(it.blocks) for it in items)

    def packed():
        return probe_logprobs_batch(model, items)

    def cached():
        return [probe_logprobs_cached(model, it) for it in items]

    def separate():
        return [probe_logprobs_reference(model, it) for it in items]

    diff = max(float((a - b).abs().max()) for a, b in zip(packed(), separate()))
    times = {}
    for name, fn in (("packed", packed), ("cached", cached), ("separate", separate)):
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        times[name] = statistics.median(runs)
    print(f"{len(items)} traces, {probes} probes, max |packed - separate| = {diff:.2e}")
    print(
        f"median seconds: packed {times['packed']:.3f}, cached {times['cached']:.3f}, "
        f"separate {times['separate']:.3f}; "
        f"packed is {times['separate'] / times['packed']:.1f}x faster than separate, "
        f"{times['cached'] / times['packed']:.1f}x faster than cached"
    )


if __name__ == "__main__":
    main()
