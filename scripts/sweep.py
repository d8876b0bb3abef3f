"""Train several variants over several seeds, resumably, then build one `rredcot compare` report.

    python scripts/sweep.py --out runs/sweep_hard --seeds 0 1 2 3 4 --jobs 2 \\
        --variant grpo algo=grpo --variant rtg redistribute.mode=return_to_go \\
        --variant anchored redistribute.mode=anchored -- +exp=builtin_hard eval.split=dev

Each variant's overrides follow its name; everything after `--` is shared. Runs go to
OUT/<variant>/seed<N>; a run whose eval.json exists is skipped and one that was interrupted after a
checkpoint is resumed, so an interrupted sweep continues where it stopped (stop it with Ctrl-C: each run
checkpoints). --jobs N trains N runs at once with the CPU threads split between them (on 2 cores, two
1-thread runs finish sooner than one 2-thread run after another). The report (OUT/report.md) compares
every variant against --baseline (a compare label; default grpo).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rredcot.compare import train_command


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, list[str]], list[str]]:
    shared = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per run (default: the cores / --jobs)")
    ap.add_argument("--baseline", default="grpo", help="the baseline's compare label")
    ap.add_argument("--split", default=None, help="report this split (an eval.extra_splits entry)")
    ap.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "OVERRIDE"))
    args = ap.parse_args(argv)
    return args, {v[0]: v[1:] for v in args.variant}, shared


def train_one(run: Path, overrides: list[str], seed: int, threads: int) -> tuple[Path, float, int]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f"seed{seed}.log", "w") as log:
        proc = subprocess.run(train_command(overrides, seed, run), stdout=log, stderr=subprocess.STDOUT, env=env)
    return run, time.perf_counter() - t, proc.returncode


def main() -> None:
    args, variants, shared = parse(sys.argv[1:])
    out = Path(args.out)
    todo = [
        (run, [*shared, *over, *(["resume=true"] if (run / "checkpoints").is_dir() else [])], seed)
        for seed in args.seeds
        for name, over in variants.items()
        if not ((run := out / name / f"seed{seed}") / "eval.json").exists()
    ]  # an interrupted run (a checkpoint, no eval.json) is resumed with the same overrides
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    print(
        f"{len(todo)} runs to train ({len(variants)} variants x {len(args.seeds)} seeds, finished ones skipped)",
        flush=True,
    )
    pool = ThreadPoolExecutor(args.jobs)
    try:
        for run, wall, rc in pool.map(lambda job: train_one(*job, threads), todo):
            print(
                f"{run}: {'done' if rc == 0 else f'FAILED (exit {rc}), see its seed log'} in {wall:.0f} s", flush=True
            )
    except KeyboardInterrupt:  # the running trains got the same Ctrl-C and checkpoint; queued ones never start
        pool.shutdown(wait=True, cancel_futures=True)
        sys.exit(130)
    pool.shutdown()
    dirs = [
        str(out / name / f"seed{s}")
        for name in variants
        for s in args.seeds
        if (out / name / f"seed{s}" / "eval.json").exists()
    ]
    cmd = [
        sys.executable,
        "-m",
        "rredcot",
        "compare",
        "--runs",
        *dirs,
        "--out",
        str(out / "report"),
        "--baseline",
        args.baseline,
    ]
    subprocess.run(cmd + (["--split", args.split] if args.split else []), check=False)


if __name__ == "__main__":
    main()
