"""Benchmark 1: what RREDCoT's credit costs per RL step, stage by stage, against GRPO on the same batch.

    python -m benchmarks.step [--quick]

One trainer (the built-in default config: 16 prompts x 8 completions of up to 48 tokens, the warm-started
tiny model) runs each step twice from the same weights and optimizer state: once with algo=rredcot's stages,
once with algo=grpo's. The sampling seeds are keyed by the step, so both see the same completions; the two
runs of a step are interleaved, so a noisy neighbour slows both alike. Reported: the median of each stage's
seconds over the timed steps (after one warm-up step), the ratio of the medians of the whole step, and the
redistribute stage's share of RREDCoT's step. --quick: debug=fast's tiny batch, 2 timed steps.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch

from benchmarks.common import Report, cli

STAGES = ("rollout", "verify", "segment", "redistribute", "update")


def _trainer(overrides: list[str]):
    from rredcot.compose import load_config
    from rredcot.trainer import Trainer
    from rredcot.ui import make_progress

    cfg = load_config(overrides)
    trainer = Trainer(cfg, overrides)
    trainer._setup_launch()
    with make_progress(False) as progress:
        trainer.setup(progress)
    return trainer


def measure(overrides: list[str], steps: int) -> dict[str, dict[str, float]]:
    """{algo: {stage: median seconds, "step": median seconds}} for algo in rredcot, grpo (same batches)."""
    from rredcot.assemble import build_stages
    from rredcot.compose import load_config

    with tempfile.TemporaryDirectory() as tmp:
        base = ["logging.progress=false", f"run_dir={tmp}/run", "train.eval_every=0", *overrides]
        trainer = _trainer([*base, "algo=rredcot"])
        stages = {"rredcot": trainer.stages, "grpo": build_stages(load_config([*base, "algo=grpo"]))}
        weights = copy.deepcopy(trainer.model.state_dict())
        optim = copy.deepcopy(trainer.learner.optimizer.state_dict())
        seen: dict[str, list[dict[str, float]]] = {k: [] for k in stages}
        for step in range(1, steps + 2):  # step 1 warms up (allocator, first-call costs) and is not timed
            drawn = trainer.sampler.drawn
            for algo, chosen in stages.items():
                trainer.sampler.drawn = drawn  # the same prompts (and keyed seeds: the same completions) for both
                trainer.model.load_state_dict(weights)
                trainer.learner.optimizer.load_state_dict(optim)
                trainer.stages = chosen
                t = time.perf_counter()
                rec = trainer.step(step)
                times = {**{s: rec.times.get(s, 0.0) for s in STAGES}, "step": time.perf_counter() - t}
                if step > 1:
                    seen[algo].append(times)
        trainer.release_run_dir()
    return {algo: {k: statistics.median(t[k] for t in rows) for k in rows[0]} for algo, rows in seen.items()}


def run(quick: bool = False) -> Report:
    torch.set_num_threads(torch.get_num_threads())
    overrides, steps = (["debug=fast"], 2) if quick else ([], 6)
    med = measure(overrides, steps)
    r, g = med["rredcot"], med["grpo"]
    rep = Report("Step overhead: algo=rredcot against algo=grpo (built-in default)" + (" [quick]" if quick else ""))
    rep.rows = [
        {
            "stage": s if s != "step" else "whole step",
            "grpo (s)": g[s],
            "rredcot (s)": r[s],
            "rredcot - grpo (s)": r[s] - g[s],
        }
        for s in (*STAGES, "step")
    ]
    rep.results = {
        "step_overhead_ratio": r["step"] / g["step"],
        "redistribute_share": r["redistribute"] / r["step"],
        "step_seconds": {"rredcot": r, "grpo": g},
        "step_config": "debug=fast" if quick else "built-in default (conf/train.yaml)",
        "timed_steps": steps,
    }
    rep.notes.append(
        f"ratio {rep.results['step_overhead_ratio']:.3f}x (target <= 1.10), redistribute "
        f"{100 * rep.results['redistribute_share']:.1f}% of the rredcot step (target <= 8%); medians of {steps} steps"
    )
    return rep


if __name__ == "__main__":
    cli(run)
