"""Run `rredcot train` for several seeds and print a results table (docs/results.md).

    python scripts/seeds.py --seeds 0 1 2 [OVERRIDES...]       (runs go to runs/seeds/seed<N>)

Wall time per run is measured around the whole CLI call (warm start included when it is not cached).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from rredcot.compare import train_command


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/seeds")
    args, overrides = ap.parse_known_args()
    rows = []
    for seed in args.seeds:
        run = Path(args.out) / f"seed{seed}"
        t = time.perf_counter()
        subprocess.run(train_command(overrides, seed, run), check=True)
        wall = time.perf_counter() - t
        res = json.loads((run / "eval.json").read_text())
        rows.append(
            (
                seed,
                wall,
                res["start"]["accuracy"],
                res["final"]["accuracy"],
                res["start"]["pass@1"],
                res["final"]["pass@1"],
            )
        )
    print("| seed | wall time (s) | greedy acc before | greedy acc after | pass@1 before | pass@1 after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {100 * r[2]:.1f} | {100 * r[3]:.1f} | {100 * r[4]:.1f} | {100 * r[5]:.1f} |")
    mean = [statistics.mean(r[i] for r in rows) for i in range(1, 6)]
    print(
        f"| mean | {mean[0]:.0f} | {100 * mean[1]:.1f} | {100 * mean[2]:.1f} | {100 * mean[3]:.1f} | "
        f"{100 * mean[4]:.1f} |"
    )


if __name__ == "__main__":
    main()
