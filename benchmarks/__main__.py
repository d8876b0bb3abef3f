"""`python -m benchmarks [--quick] [--only NAME ...] [--out FILE]` (`make bench`): every benchmark, each in a fresh
process (memory and threads of one do not leak into the next), then benchmarks/results.json: the machine, the
headline keys the README's performance table is written from (`python -m benchmarks.report`), every report."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine

# run order: the cheap ones first, so a partial run still says something
NAMES = ("probes", "montecarlo", "rollout", "step", "memory")
HEADLINE = {  # results.json key -> (benchmark, its results key)
    "step_overhead_ratio": ("step", "step_overhead_ratio"),
    "redistribute_share": ("step", "redistribute_share"),
    "packed_speedup_L1024_K32": ("probes", "packed_speedup_L1024_K32"),
    "rollout_cache_speedup_L1024_K32": ("probes", "rollout_cache_speedup_L1024_K32"),
    "mc_over_rredcot_seconds": ("montecarlo", "mc_over_rredcot_seconds"),
    "rollout_vs_generate": ("rollout", "rollout_vs_generate"),
    "peak_memory_mb": ("memory", "peak_memory_mb"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="each benchmark's smallest sizes (the smoke test's)")
    ap.add_argument("--only", nargs="+", choices=NAMES, help="run only these")
    ap.add_argument("--out", default="benchmarks/results.json")
    args = ap.parse_args()
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() and args.only else {}
    reports = dict(old.get("benchmarks", {}))  # --only refreshes some, keeps the others' last figures
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or NAMES:
            dest = Path(tmp) / f"{name}.json"
            quick = ["--quick"] if args.quick else []
            cmd = [sys.executable, "-m", f"benchmarks.{name}", "--json", str(dest), *quick]
            t = time.time()
            done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": os.getcwd()})
            if done.returncode != 0 or not dest.exists():
                print(f"benchmark {name} failed (exit {done.returncode}); the others go on", file=sys.stderr)
                reports[name] = {"error": f"exit {done.returncode}"}
                continue
            reports[name] = {**json.loads(dest.read_text()), "seconds": time.time() - t}
    results = {
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "seconds": time.time() - t0,
    }
    for key, (bench, inner) in HEADLINE.items():
        results[key] = reports.get(bench, {}).get("results", {}).get(inner)
    results["benchmarks"] = reports
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
