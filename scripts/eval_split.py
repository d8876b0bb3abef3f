"""Evaluate finished sweep runs on another split (e.g. test, after choosing on dev) and compare them, paired by seed.

    python scripts/eval_split.py --split test --baseline grpo --jobs 2 runs/i20_default/*/seed*

Each run's latest checkpoint is evaluated with `rredcot eval checkpoint=RUN eval.split=SPLIT` (the run's own
task, settings and eval prompts); RUN/evals/<checkpoint>_<split>.json is reused when it exists, so an interrupted
pass continues. Runs are grouped by their parent directory's name (a sweep's variant) and each group is compared
with --baseline by a paired t-test over the seeds both have (seed from the run's config). Prints a markdown
table and writes it to --out (default: the runs' common parent / <split>.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from rredcot.stats import mean_ci, paired_t


def latest_checkpoint(run: Path) -> Path:
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    if not ckpts:
        raise SystemExit(f"{run} has no checkpoints/step_*: train it to the end first.")
    return ckpts[-1]


def evaluate(run: Path, split: str, threads: int) -> dict:
    path = run / "evals" / f"{latest_checkpoint(run).name}_{split}.json"
    if not path.exists():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "rredcot", "eval", f"checkpoint={run}", f"eval.split={split}"]
        cmd.append("logging.progress=false")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"rredcot eval failed on {run}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(path.read_text())


def table(results: dict[str, dict[int, dict]], baseline: str, split: str) -> str:
    lines = [
        f"| variant | seeds | {split} greedy acc (%) | pass@1 (%) | completion tokens | vs {baseline} (points) | p |",
        "|---|---|---|---|---|---|---|",
    ]
    base = results.get(baseline, {})
    for name, by_seed in results.items():
        acc = mean_ci([r["accuracy"] for r in by_seed.values()])
        p1 = mean_ci([r["pass@1"] for r in by_seed.values()])
        length = sum(r["mean_length"] for r in by_seed.values()) / len(by_seed)
        shared = sorted(set(by_seed) & set(base))
        diff, p = "-", "-"
        if name != baseline and len(shared) >= 2:
            t = paired_t([by_seed[s]["accuracy"] for s in shared], [base[s]["accuracy"] for s in shared])
            diff = f"{100 * t['diff']:+.1f} [{100 * (t['diff'] - t['ci']):+.1f}, {100 * (t['diff'] + t['ci']):+.1f}]"
            p = f"{t['p']:.3f}"
        lines.append(
            f"| {name} | {len(by_seed)} | {100 * acc[0]:.1f} ± {100 * acc[1]:.1f} | "
            f"{100 * p1[0]:.1f} ± {100 * p1[1]:.1f} | {length:.1f} | {diff} | {p} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--baseline", default="grpo", help="the variant (parent directory name) to compare with")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    runs = [r for r in args.runs if (r / "eval.json").exists()]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        found = list(pool.map(lambda r: evaluate(r, args.split, threads), runs))
    results: dict[str, dict[int, dict]] = {}
    for run, res in zip(runs, found):
        seed = int(yaml.safe_load((run / "config.yaml").read_text())["seed"])
        results.setdefault(run.parent.name, {})[seed] = res
    md = table(results, args.baseline, args.split)
    print(md)
    out = args.out or Path(os.path.commonpath([str(r.parent.parent) for r in runs])) / f"{args.split}.md"
    out.write_text(md + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
