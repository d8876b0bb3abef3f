"""Benchmark: peak memory of the probe pass against trace length, packed path vs KV-cache path.

    python scripts/bench_probe_memory.py [--lengths 1024 2048 4096 8192 16384 32768]

A tiny random Qwen2 (2 layers, hidden 64) with a 151,936-token vocabulary (Qwen2.5's), CPU, fp32; one
trace of L tokens with 8 boundaries and 3 answers of 8 tokens after an 8-token forcing text. Each
(path, length) runs in a fresh process and reports its peak resident memory during the probe pass above
its resident memory just before it (Linux: the peak is reset through /proc/self/clear_refs), in MiB. The
packed path's dense S x S mask makes it quadratic; it is
skipped where its mask alone would pass --max-packed-gib.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from rredcot.stages.probes import ProbeItem, probe_logprobs_batch, probe_logprobs_cached
L, path = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=L + 64, tie_word_embeddings=True)
model = Qwen2ForCausalLM(cfg).eval()
g = torch.Generator().manual_seed(1)
trace = torch.randint(10, 151000, (L,), generator=g)
bounds = [int(L * (k + 1) / 8) for k in range(8)]
force = torch.randint(10, 151000, (8,), generator=g)
answers = [torch.randint(10, 151000, (8,), generator=g) for _ in range(3)]
item = ProbeItem.from_parts(trace, bounds, force, answers)
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
before = status("VmRSS")
out = probe_logprobs_batch(model, [item])[0] if path == "packed" else probe_logprobs_cached(model, item)
peak = status("VmHWM")
row = {"L": L, "path": path, "peak_mib": (peak - before) / 1024, "S": item.packed_tokens, "sum": float(out.sum())}
print(json.dumps(row))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--max-packed-gib", type=float, default=2.0, help="skip the packed path above this mask size")
    args = ap.parse_args()
    print("| trace tokens | packed path (MiB) | KV-cache path (MiB) | values agree |")
    print("|---|---|---|---|")
    for L in args.lengths:
        row = {}
        for path in ("packed", "cached"):
            S = L + 8 * 3 * 16
            if path == "packed" and S * S * 4 / 2**30 > args.max_packed_gib:
                row[path] = None
                continue
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(L), path], capture_output=True, text=True, check=True
            )
            row[path] = json.loads(out.stdout.strip().splitlines()[-1])
        agree = (
            (
                "yes"
                if abs(row["packed"]["sum"] - row["cached"]["sum"]) < 1e-2 * max(1, abs(row["cached"]["sum"]))
                else "NO"
            )
            if row["packed"]
            else "-"
        )
        packed = (
            f"{row['packed']['peak_mib']:.0f}" if row["packed"] else f"not run (mask alone {S * S * 4 / 2**30:.0f} GiB)"
        )
        print(f"| {L} | {packed} | {row['cached']['peak_mib']:.0f} | {agree} |", flush=True)


if __name__ == "__main__":
    main()
