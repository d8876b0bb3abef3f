"""Benchmark: one run on 1 process and on N processes (torchrun, gloo on CPU; NCCL on GPUs), same config.

    python scripts/bench_data_parallel.py [--procs 2] [--steps 12] [OVERRIDES...]

Trains the same run (default: the built-in task, its default batch of 16 prompts x 8) once per process
count, then prints the median per-step time of each (metrics.jsonl's time/step_s, the slowest rank's,
steps after the first), their ratio (the number to quote: absolute times on a shared machine are noise),
and the largest weight difference between the two final checkpoints (the same run at any world size).
On a CPU machine the processes share its cores: the ratio says what the split costs or saves there,
not what N GPUs give.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def train(procs: int, run: Path, overrides: list[str]) -> None:
    launch = (
        [sys.executable, "-m", "rredcot"]
        if procs == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            "-m",
            "rredcot",
        ]
    )
    subprocess.run([*launch, "train", f"run_dir={run}", *overrides], check=True, stdout=subprocess.DEVNULL)


def step_times(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["time/step_s"] for r in rows if "time/step_s" in r][1:]  # the first step warms caches up


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = (load_file(str(sorted((r / "checkpoints").glob("step_*"))[-1] / "model.safetensors")) for r in (a, b))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    args, overrides = ap.parse_known_args()
    overrides = [
        "logging.progress=false",
        f"train.steps={args.steps}",
        "train.eval_every=0",
        "train.save_every=0",
        "eval.n_prompts=16",
        "update.micro_batch_size=32",
        *overrides,
    ]
    out = Path(tempfile.mkdtemp(prefix="bench_dp_"))
    runs = {n: out / f"procs{n}" for n in (1, args.procs)}
    for n, run in runs.items():
        train(n, run, overrides)
    med = {n: statistics.median(step_times(run)) for n, run in runs.items()}
    print(
        f"median step time, {args.steps - 1} steps: 1 process {med[1]:.2f} s, {args.procs} processes "
        f"{med[args.procs]:.2f} s; ratio {med[args.procs] / med[1]:.2f}"
    )
    print(f"largest weight difference after {args.steps} steps: {max_weight_diff(*runs.values()):.2e}  (runs in {out})")


if __name__ == "__main__":
    main()
