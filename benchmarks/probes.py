"""Benchmark 2: scoring the answer-forcing probes, every path against one forward per probe and against the floor.

    python -m benchmarks.probes [--quick]

A small random Qwen2 with the real vocabulary (151,936; hidden 64, 2 layers, fp32, CPU), one trace of L
tokens, K boundaries evenly spaced, |A| answers of 4 tokens after a 12-token forcing text (the length of
"\\n</think>\\n\\nThe final answer is \\\\boxed{" in Qwen's tokenizer), scored from the forcing text's end.
Paths (stages/probes.py):
- per-probe: one forward of trace[:b] + block per probe, only the scored rows projected (the fair baseline);
- packed: the trace and every probe tree in one forward with a 4-D mask (S x S: used while S is small);
- cached: one forward of the trace fills a KV cache, then the probe trees run on it (what long traces use
  when no rollout cache exists: rollout=vllm, a lagged critic);
- rollout cache: the probe trees on a cache the sampler already filled (rollout=sample): the floor, only the
  probe tokens are forwarded. Its time excludes the cache's filling, which the rollout paid.
Times are medians of interleaved repeats; `agree` is the largest difference from per-probe (or from cached
where per-probe is not run). Peak memory against L (K = 32, |A| = 4) is measured per path in a fresh process.
"""

from __future__ import annotations

import torch

from benchmarks.common import Report, cli, interleaved_medians, peak_rss_mib

VOCAB = 151_936
FORCE_TOKENS, ANSWER_TOKENS = 12, 4

SETUP = r"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from rredcot.stages.probes import ProbeItem

VOCABS = {"qwen2-vocab": 151936, "builtin-shape": 101}


def model_of(L, kind="qwen2-vocab"):
    torch.manual_seed(0)
    if kind == "qwen2-vocab":  # Qwen2's real vocabulary on a thin body: the LM head dominates
        cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=L + 4096,
                          tie_word_embeddings=True)
        return Qwen2ForCausalLM(cfg).eval()
    cfg = LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=L + 4096)
    return LlamaForCausalLM(cfg).eval()  # the built-in model's shape (conf/model/builtin.yaml), longer positions


def item_of(L, K, A, vocab=151936, row=None):
    g = torch.Generator().manual_seed(1)
    tok = lambda n: torch.randint(10, vocab - 1, (n,), generator=g)
    trace, force = tok(L), tok(12)
    blocks = [torch.cat([force, tok(4)]) for _ in range(A)]
    bounds = [max(1, int(L * (k + 1) / K)) for k in range(K)]
    return ProbeItem(trace, bounds, blocks, [12] * A, row=row)


def rollout_cache(model, item):
    from transformers import DynamicCache
    from rredcot.stages.rollout import cache_kwarg
    from rredcot.types import RolloutKV
    cache, L = DynamicCache(), len(item.trace_ids)
    with torch.no_grad():
        model(input_ids=item.trace_ids[None], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return [RolloutKV(0, cache, [0], [L], model)]
"""

MEMORY_CHILD = (
    SETUP
    + r"""
import json, sys
from benchmarks.common import peak_mib, reset_peak
from rredcot.stages.probes import probe_logprobs_batch, probe_logprobs_cached, score_items
L, path = int(sys.argv[1]), sys.argv[2]
model = model_of(L)
item = item_of(L, 32, 4, 151936, row=0)
kv = rollout_cache(model, item) if path == "rollout cache" else None
base = reset_peak()
if path == "packed":
    probe_logprobs_batch(model, [item])
elif path == "cached":
    probe_logprobs_cached(model, item)
else:
    score_items(model, [item], kv=kv)
print(json.dumps({"peak_mib": peak_mib() - base}))
"""
)


def _env():
    ns: dict = {}
    exec(SETUP, ns)  # the same model and traces the memory children build
    return ns


@torch.no_grad()
def per_probe(model, item) -> torch.Tensor:
    """One forward per probe, logits only for the rows that predict its scored tokens: [K, |A|]."""
    from rredcot.logprobs import selective_log_softmax

    out = torch.zeros(len(item.boundaries), item.width)
    for k, b in enumerate(item.boundaries):
        for j, (blk, s0) in enumerate(item.at(k)):
            seq = torch.cat([item.trace_ids[:b], blk])
            n = len(blk) - s0  # scored tokens, predicted by the n positions before them
            logits = model(input_ids=seq[None], logits_to_keep=n + 1).logits[0, :-1].float()
            out[k, j] = selective_log_softmax(logits, seq[len(seq) - n :]).sum()
    return out


def _time_point(ns, kind, model, L: int, K: int, A: int, repeats: int, baseline: bool, packed: bool) -> dict:
    from rredcot.stages.probes import probe_logprobs_batch, probe_logprobs_cached, score_items

    item = ns["item_of"](L, K, A, ns["VOCABS"][kind], row=0)
    kv = ns["rollout_cache"](model, item)
    fns = {
        "cached": lambda: probe_logprobs_cached(model, item),
        "rollout cache": lambda: score_items(model, [item], kv=kv),
    }
    if packed:
        fns["packed"] = lambda: probe_logprobs_batch(model, [item])[0]
    if baseline:
        fns["per-probe"] = lambda: per_probe(model, item)
    got = {k: f() for k, f in fns.items()}
    got["rollout cache"] = got["rollout cache"][0]
    ref = got.get("per-probe", got["cached"])
    med = interleaved_medians(fns, repeats=repeats, warmup=0)
    row = {"model": kind, "L": L, "K": K, "A": A, "probe tokens": item.probe_tokens}
    row.update({f"{k} (ms)": 1000 * med[k] for k in ("per-probe", "packed", "cached", "rollout cache") if k in med})
    if "per-probe" in med:
        row["speed-up packed"] = med["per-probe"] / med["packed"] if "packed" in med else None
        row["speed-up rollout cache"] = med["per-probe"] / med["rollout cache"]
    row["agree"] = max(float((g - ref).abs().max()) for g in got.values())
    return row


def run(quick: bool = False) -> Report:
    ns = _env()
    if quick:
        grid = [("builtin-shape", 1024, 32, 4), ("qwen2-vocab", 256, 8, 1)]
        lengths, repeats = [256], 1
    else:
        grid = [("builtin-shape", L, K, 4) for L in (256, 1024, 4096) for K in (8, 32, 128)]
        grid += [("builtin-shape", 1024, K, 1) for K in (8, 32, 128)]
        grid += [("qwen2-vocab", L, K, 4) for L in (1024, 4096, 16384, 32768) for K in (8, 32, 128)]
        grid += [("qwen2-vocab", 1024, 32, 1)]
        lengths, repeats = [1024, 4096, 16384, 32768], 2
    title = "Probe scoring: packed and KV-cache paths against one forward per probe"
    rep = Report(title + (" [quick]" if quick else ""))
    models: dict[tuple[str, int], object] = {}
    for kind, L, K, A in grid:
        model = models.setdefault((kind, L), ns["model_of"](L, kind))
        baseline = (L <= 1024 and K <= 32) or (L == 256) or (L <= 4096 and K <= 8)  # it costs (K+1) x A forwards
        packed = (L + K * A * 16) <= 8192
        rep.rows.append(_time_point(ns, kind, model, L, K, A, repeats, baseline, packed))
        models.pop((kind, L // 4), None)
    point = next(r for r in rep.rows if (r["model"], r["L"], r["K"], r["A"]) == ("builtin-shape", 1024, 32, 4))
    rep.results["packed_speedup_L1024_K32"] = point["speed-up packed"]
    rep.results["rollout_cache_speedup_L1024_K32"] = point["speed-up rollout cache"]
    real = [r for r in rep.rows if (r["model"], r["L"], r["K"], r["A"]) == ("qwen2-vocab", 1024, 32, 4)]
    if real:
        rep.results["packed_speedup_L1024_K32_qwen2_vocab"] = real[0]["speed-up packed"]
        rep.results["rollout_cache_speedup_L1024_K32_qwen2_vocab"] = real[0]["speed-up rollout cache"]
    rep.results["probe_agree_max"] = max(r["agree"] for r in rep.rows)
    rep.results["probe_times"] = rep.rows
    rep.results["probe_memory_mib"] = _memory(lengths)
    rep.notes.append(
        f"built-in shape, L=1024, K=32, |A|=4: packed {point['speed-up packed']:.1f}x, rollout cache "
        f"{point['speed-up rollout cache']:.1f}x faster than one forward per probe (target >= 10x); all paths "
        f"agree to {rep.results['probe_agree_max']:.1e} (target 1e-4)"
    )
    return rep


def _memory(lengths: list[int]) -> dict[str, dict[str, float | str]]:
    """Peak MiB of the probe pass (K = 32, |A| = 4) per path and trace length, each in a fresh process."""
    out: dict[str, dict[str, float | str]] = {}
    for path in ("packed", "cached", "rollout cache"):
        out[path] = {}
        for L in lengths:
            S = L + 32 * 4 * (FORCE_TOKENS + ANSWER_TOKENS)
            if path == "packed" and S * S * 4 > 2 * 2**30:
                out[path][str(L)] = f"not run (its S x S mask alone: {S * S * 4 / 2**30:.0f} GiB)"
                continue
            got = peak_rss_mib(MEMORY_CHILD, str(L), path)
            out[path][str(L)] = got.get("peak_mib", got.get("error"))
    return out


if __name__ == "__main__":
    cli(run)
