"""`python -m benchmarks.report [results.json]`: the README's performance table, written from benchmarks/results.json
(tests/unit/test_bench_report.py checks that the README holds exactly this table)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results.json")


def _x(v: Any, digits: int = 2) -> str:
    return "not run" if v is None else f"{v:.{digits}f}x"


def _both(d: dict | None, keys: tuple[str, ...], digits: int = 2) -> str:
    if not d:
        return "not run"
    return " / ".join(_x(d.get(k), digits) for k in keys)


def _memory(mem: dict | None) -> str:
    if not mem:
        return "not run"
    before, after = mem.get("before", {}), mem.get("after", {})
    both = [k for k in after if isinstance(before.get(k), (int, float))]
    longest = max(after, key=int)
    text = ""
    if both:
        k = max(both, key=int)
        text = f"{before[k]:,.0f} -> {after[k]:,.0f} MiB at {int(k):,} tokens; "
    return text + f"{after[longest]:,.0f} MiB at {int(longest):,} (before: too large to run)"


def table(r: dict[str, Any]) -> str:
    """The Markdown table of the headline figures in results.json `r`, with their targets."""
    mc = r.get("mc_over_rredcot_seconds") or {}
    share = r.get("redistribute_share")
    rows = [
        ("Step time, `algo=rredcot` / `algo=grpo` (built-in default)", _x(r.get("step_overhead_ratio")), "<= 1.10x"),
        ("Redistribute's share of the rredcot step", "not run" if share is None else f"{100 * share:.1f}%", "<= 8%"),
        (
            "Probe scoring at L=1024, K=32, A=4 vs one forward per probe: packed / on the rollout's cache",
            f"{_x(r.get('packed_speedup_L1024_K32'), 1)} / {_x(r.get('rollout_cache_speedup_L1024_K32'), 1)}",
            ">= 10x",
        ),
        ("Monte Carlo values (M = 4 / 8 / 16) over RREDCoT's, seconds", _both(mc, ("4", "8", "16"), 0), ">= 50x"),
        (
            "Rollout tokens/s, `rollout=sample` / `model.generate` (built-in / Qwen2 vocabulary)",
            _both(r.get("rollout_vs_generate"), ("builtin", "qwen2_vocab")),
            ">= 1.0x",
        ),
        ("Peak memory of a micro-batch, before -> after chunked log-probs", _memory(r.get("peak_memory_mb")), "-"),
    ]
    m = r.get("machine", {})
    lines = ["| Benchmark | Measured | Target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    where = f"{m.get('cpu', m.get('platform', '?'))}, {m.get('cpu_count', '?')} cores, torch {m.get('torch', '?')}"
    lines.append("")
    lines.append(f"Measured {r.get('date', '?')[:10]} on {where} by `{r.get('command', 'python -m benchmarks')}`.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else RESULTS).read_text())))
