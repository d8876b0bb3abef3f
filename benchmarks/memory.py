"""Benchmark: peak memory of one training micro-batch against completion length, with the full [1, T, V]
logits (before: logit_chunk=0, the path until issue 23) and the chunked log-probs (after: the default,
rredcot/logprobs.py), and the time of a micro-batch both ways at 1k tokens.

    python -m benchmarks.memory [--quick]

The model: a random Qwen2 with the real vocabulary (151,936) on a thin body (hidden 64, 2 layers, tied
embeddings, fp32, CPU), so that the output layer is what the memory is about. A micro-batch: 1 row, a 16-token
prompt, T completion tokens; forward, dapo's loss (rredcot.losses.policy_loss, advantages 1) and backward.
Each point runs in a fresh process and reports its peak resident size above its size just before the
micro-batch (the built model and inputs), in MiB. A "before" point whose estimated peak (BEFORE_COPIES fp32
copies of its logits) would not fit the budget (BEFORE_BUDGET_GIB, or 60% of the memory available now less
2 GiB) is not run: its row says so, with the estimate. The before and after series run side by side, one
thread per child. Time: interleaved medians (benchmarks.common) in this process, its default threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from benchmarks.common import Report, cli, interleaved_medians, peak_rss_mib

VOCAB = 151_936
PROMPT = 16
LENGTHS, QUICK_LENGTHS = (1024, 2048, 4096, 8192, 16384), (256,)  # quick: the smoke test, one point
TIME_AT, QUICK_TIME_AT = 1024, 256  # quick: no chunked_time_ratio_1k
BEFORE_COPIES = 4.1  # measured: the full path peaks at 4.0-4.1 x its fp32 logits (1k-4k tokens)
BEFORE_BUDGET_GIB = 12.0  # a 24 GiB machine shared with others: 8k (an estimated 19 GiB) is not run

SETUP = r"""
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from rredcot.logprobs import completion_logprobs
from rredcot.losses import policy_loss


def model_and_batch(T):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T + 64,
                      tie_word_embeddings=True)
    g = torch.Generator().manual_seed(1)
    prompt, completion = torch.randint(10, 151936, (1, 16), generator=g), torch.randint(10, 151936, (1, T), generator=g)
    return Qwen2ForCausalLM(cfg), (prompt, torch.ones_like(prompt), completion, torch.ones_like(completion))


def micro_batch(model, batch, chunk):
    # chunk 0: the full [1, T, V] logits; None: the default chunks
    model.zero_grad(set_to_none=True)
    lp, _ = completion_logprobs(model, *batch, temperature=1.0, logit_chunk=chunk)
    mask = batch[3].float()
    policy_loss(lp, lp.detach(), torch.ones(lp.shape[0]), mask, loss_type="dapo").backward()
    return float(lp.detach().sum())
"""

CHILD = (
    SETUP
    + r"""
import json, sys
from benchmarks.common import peak_mib, reset_peak
torch.set_num_threads(1)  # two children run side by side
T, chunk = int(sys.argv[1]), (0 if sys.argv[2] == "before" else None)
model, batch = model_and_batch(T)
base = reset_peak()
micro_batch(model, batch, chunk)
print(json.dumps({"peak_mib": peak_mib() - base, "base_mib": base}))
"""
)


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def _series(path: str, lengths, budget: float) -> dict[int, float | str]:
    """{T: MiB, or why not} for one path, its points one after another, each in a fresh process."""
    out: dict[int, float | str] = {}
    for T in lengths:
        est = BEFORE_COPIES * T * VOCAB * 4 / 2**30
        if path == "before" and est > budget:
            out[T] = f"not run: ~{est:.1f} GiB estimated (budget {budget:.1f} GiB)"
            continue
        got = peak_rss_mib(CHILD, str(T), path)
        out[T] = got.get("peak_mib", got.get("error"))
    return out


def _memory(lengths) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """({"before": {T: MiB}, "after": {T: MiB}}, the table's rows). The two paths' series run side by side
    (one thread per child: two cores), so the largest "before" point shares the machine with one "after"."""
    budget = min(BEFORE_BUDGET_GIB, 0.6 * _available_gib() - 2.0)  # 2 GiB: the "after" child beside it
    with ThreadPoolExecutor(2) as pool:
        jobs = {path: pool.submit(_series, path, lengths, budget) for path in ("before", "after")}
        got = {path: job.result() for path, job in jobs.items()}
    peaks = {path: {str(T): v for T, v in got[path].items() if isinstance(v, float)} for path in got}
    rows = []
    for T in lengths:
        row = {"completion tokens": T, "fp32 logits (MiB)": T * VOCAB * 4 / 2**20}
        row |= {f"{path} (MiB)": got[path][T] for path in ("before", "after")}
        if str(T) in peaks["before"] and str(T) in peaks["after"]:
            row["before / after"] = peaks["before"][str(T)] / peaks["after"][str(T)]
        rows.append(row)
    return peaks, rows


def _time(T: int, quick: bool) -> dict[str, float]:
    """Median seconds of a micro-batch at T tokens, before and after, interleaved; they must agree."""
    ns: dict = {}
    exec(SETUP, ns)
    model, batch = ns["model_and_batch"](T)
    sums: dict[str, float] = {}

    def step(path: str, chunk: int | None) -> None:
        sums[path] = ns["micro_batch"](model, batch, chunk)

    med = interleaved_medians(
        {"before": lambda: step("before", 0), "after": lambda: step("after", None)},
        repeats=1 if quick else 3,
        warmup=0,  # kept short: on CPU every call maps its large tensors afresh, the first one included
    )
    assert abs(sums["before"] - sums["after"]) < 1e-6 * T, sums  # the same log-probs both ways
    return med


def run(quick: bool = False) -> Report:
    from rredcot.logprobs import LOGIT_CHUNK

    peaks, rows = _memory(QUICK_LENGTHS if quick else LENGTHS)
    both = [T for T in peaks["after"] if T in peaks["before"]]
    largest = max(both, key=int) if both else None
    time_at = QUICK_TIME_AT if quick else TIME_AT
    med = _time(time_at, quick)
    rep = Report("Memory of a training micro-batch: full logits (before) against chunked log-probs (after)")
    rep.name += " [quick]" if quick else ""
    rep.rows = rows
    rep.results = {
        "peak_memory_mb": peaks,
        "memory_ratio_8k": peaks["before"][largest] / peaks["after"][largest] if largest else None,
        "memory_ratio_at": int(largest) if largest else None,
        "chunked_time_ratio": med["after"] / med["before"],
        "micro_batch_seconds": med,
        "time_at_tokens": time_at,
        "logit_chunk": LOGIT_CHUNK,
        "model": f"Qwen2, vocab {VOCAB}, hidden 64, 2 layers, tied, fp32, CPU; 1 row, {PROMPT}-token prompt",
    }
    if time_at == 1024:
        rep.results["chunked_time_ratio_1k"] = rep.results["chunked_time_ratio"]
    rep.notes += [
        "MiB above each process's resident size before the micro-batch (model and inputs built); 1 row",
        f"memory_ratio_8k: before / after at {largest} tokens, the largest length both ran (see the rows)",
        f"time of a micro-batch at {time_at} tokens: after / before = {rep.results['chunked_time_ratio']:.2f} "
        f"(medians {med['before']:.2f} s / {med['after']:.2f} s, interleaved, torch threads {torch.get_num_threads()})",
    ]
    return rep


if __name__ == "__main__":
    cli(run)
