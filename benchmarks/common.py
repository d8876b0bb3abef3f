"""What every benchmark shares: medians of timed repeats, peak memory of a child process, the machine, a table.

A benchmark module defines `run(quick: bool) -> Report` and ends with `if __name__ == "__main__": cli(run)`."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Report:
    """One benchmark's outcome: `results` (the keys results.json holds), `rows` (its printed table), `notes`."""

    name: str
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """The median wall time of fn() over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each fn, their calls interleaved (a, b, a, b, ...) so that a noisy neighbour slows
    both alike: the ratio of two medians measured this way is the number to quote."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_rss_mib(code: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    """Run `code` in a fresh Python process and return the JSON object its last stdout line prints. The code
    measures its own peak with `reset_peak()` / `peak_mib()` from this module (Linux /proc), so each point of a
    memory curve starts from a clean process. A child that fails returns {"error": its last stderr line}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return {"error": f"exit {out.returncode}: {tail}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak() -> float:
    """Reset this process's peak resident size (VmHWM) to its current size; returns that size in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS") / 1024


def peak_mib() -> float:
    """This process's peak resident size since the last reset_peak(), in MiB."""
    return _status("VmHWM") / 1024


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of dict rows (the union of their keys, in first-seen order)."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def show(report: Report) -> None:
    print(f"\n## {report.name}\n")
    print(table(report.rows))
    for note in report.notes:
        print(f"- {note}")
    print(json.dumps(report.results, indent=1))


def cli(run: Callable[[bool], Report]) -> None:
    """`python -m benchmarks.NAME [--quick] [--json FILE]`: run one benchmark, print its table and results
    (and write them to FILE: how `python -m benchmarks` collects them)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the smallest sizes, for a smoke test")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()
    report = run(args.quick)
    show(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"name": report.name, "results": report.results, "rows": report.rows, "notes": report.notes}, f)
