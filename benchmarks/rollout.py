"""Benchmark: rollout=sample's decode loop against transformers' model.generate, and the keyed sampler's cost.

    python -m benchmarks.rollout [--quick]

Rollout: generated tokens per second of rredcot.stages.rollout.generate (what rollout=sample calls, with the
keyed uniforms the backend passes it) against model.generate(do_sample=True) on the same left-padded batch and
settings (temperature 1, top_p 1, top_k 0, the same max_new_tokens and EOS ids), on
- builtin: the warm-started built-in model, 64 prompts of the built-in task's dev split x 48 new tokens;
- qwen2_vocab: a random Qwen2 with the real vocabulary (151,936; hidden 64, 2 layers, tied embeddings, fp32),
  16 random prompts of 8-32 tokens x 64 new tokens (a random model rarely emits EOS: both run full length).
Tokens are counted honestly on both sides: each row's tokens up to and including its first EOS, never a finished
row's padding. Each side draws its own samples, so the counts may differ by a few tokens (in the table).
ratio = our tokens/s over generate's (target >= 1.0); medians of interleaved repeats after a warm-up.
Full run, on the Qwen2 vocabulary: also `before`, generate with the full-cumsum draw issue 23 replaced.

Sampler: draw() (stages/sampling.py, the two-level inverse CDF) against the one float64 cumsum over the
vocabulary it replaced, torch.multinomial (what model.generate samples with) and torch.softmax alone (for
scale): ms per call at N x V, and the scratch each needs (peak resident size above its inputs, fresh process).
"""

from __future__ import annotations

from unittest import mock

import torch

from benchmarks.common import Report, cli, interleaved_medians, peak_rss_mib, table

VOCAB = 151_936
QWEN_STOPS, QWEN_PAD = [151_643, 151_645], 151_643  # Qwen2's <|endoftext|>, <|im_end|>


def draw_full_cumsum(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """draw() until issue 23: one float64 cumsum over the whole vocabulary ([N, V] float64 scratch, twice)."""
    cdf = probs.double().cumsum(-1)
    target = u.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    return (cdf <= target).sum(-1).clamp(max=probs.shape[-1] - 1)


# ---- the batches ----


def builtin_case(rows: int, new_tokens: int, overrides: tuple[str, ...] = ()) -> dict:
    """The warm-started built-in model and `rows` dev prompts, left-padded (--quick: debug=fast's small warm start)."""
    from rredcot.compose import load_config
    from rredcot.registry import entry
    from rredcot.stages.rollout import stop_ids
    from rredcot.task.warmstart import load_policy

    cfg = load_config(list(overrides))
    model, tok = load_policy(cfg)
    prompts = [s.prompt for s in entry("task", cfg.task.name).obj(cfg.task, "dev", tok)[:rows]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    stops = stop_ids(model, tok)
    return _case(model.eval(), enc["input_ids"], enc["attention_mask"], stops, tok.pad_token_id, new_tokens)


def qwen2_case(rows: int, new_tokens: int) -> dict:
    """A random thin Qwen2 with the real vocabulary, and `rows` random prompts of 8-32 tokens, left-padded."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=QWEN_STOPS,
        pad_token_id=QWEN_PAD,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 33, (rows,), generator=g).tolist()
    width = max(lengths)
    ids = torch.full((rows, width), QWEN_PAD)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(0, QWEN_STOPS[0], (n,), generator=g)  # no stop id in a prompt
        mask[i, width - n :] = 1
    return _case(model, ids, mask, QWEN_STOPS, QWEN_PAD, new_tokens)


def _case(model, ids, mask, stops, pad, new_tokens) -> dict:
    from rredcot.stages.sampling import keyed_uniforms, row_seeds

    u = keyed_uniforms(row_seeds(0, "bench", 1, range(ids.shape[0])), new_tokens)  # [N, T], as the backend does
    return {"model": model, "ids": ids, "mask": mask, "stops": stops, "pad": pad, "T": new_tokens, "u": u}


# ---- the two samplers, each returning its generated token count ----


def ours(case: dict) -> int:
    """rollout=sample's generate(): the tokens in its completion mask."""
    from rredcot.stages.rollout import generate

    out = generate(
        case["model"],
        case["ids"],
        case["mask"],
        eos_id=case["stops"],
        pad_id=case["pad"],
        max_new_tokens=case["T"],
        uniforms=case["u"],
    )
    return int(out[1].sum())


def theirs(case: dict) -> int:
    """model.generate(do_sample=True): each row's tokens up to and including its first stop id."""
    from transformers import GenerationConfig

    gen = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,  # 0: off (GenerationConfig's default is 50)
        max_new_tokens=case["T"],
        eos_token_id=case["stops"],
        pad_token_id=case["pad"],
    )
    torch.manual_seed(0)
    out = case["model"].generate(input_ids=case["ids"], attention_mask=case["mask"], generation_config=gen)
    new = out[:, case["ids"].shape[1] :]  # [N, T']
    stop = torch.isin(new, torch.tensor(case["stops"])).long()
    return int(((stop.cumsum(1) - stop) == 0).sum())  # no stop strictly before: the stop itself counts


# ---- measurements ----


def rollout_row(name: str, case: dict, repeats: int, extras: bool) -> dict:
    """Tokens/s of each sampler on `case`, interleaved. extras: above DRAW_BLOCK tokens (below it draw runs the
    old code), also generate with the full-cumsum draw (`before`)."""
    import rredcot.stages.rollout as rollout
    from rredcot.stages.sampling import DRAW_BLOCK

    counts: dict[str, int] = {}

    def timed(key, fn):
        return lambda: counts.__setitem__(key, fn())

    def before():
        with mock.patch.object(rollout, "draw", draw_full_cumsum):  # generate reads `draw` at call time
            return ours(case)

    fns = {
        "ours": timed("ours", lambda: ours(case)),
        "generate": timed("generate", lambda: theirs(case)),
    }
    if extras and case["model"].config.vocab_size > DRAW_BLOCK:
        fns["before"] = timed("before", before)
    sec = interleaved_medians(fns, repeats=repeats)
    rate = {k: counts[k] / sec[k] for k in fns}
    row = {"model": name, "rows x new": f"{case['ids'].shape[0]} x {case['T']}"}
    row |= {f"{k} tok/s": rate[k] for k in fns}
    row |= {"ours tokens": counts["ours"], "generate tokens": counts["generate"]}
    row["ours / generate"] = rate["ours"] / rate["generate"]
    row |= {f"{k} / ours": rate[k] / rate["ours"] for k in fns if k not in ("ours", "generate")}
    return row


def _draw(p, u, logits):
    from rredcot.stages.sampling import draw

    return draw(p, u)


SAMPLERS = {  # name -> fn(probs [N, V], u [N], logits [N, V])
    "draw": _draw,
    "full_cumsum": lambda p, u, logits: draw_full_cumsum(p, u),
    "multinomial": lambda p, u, logits: torch.multinomial(p, 1),
    "softmax": lambda p, u, logits: torch.softmax(logits, -1),
}

SCRATCH = r"""
import json, sys, torch
from benchmarks.common import peak_mib, reset_peak
from benchmarks.rollout import SAMPLERS
n, v = int(sys.argv[1]), int(sys.argv[2])
logits = torch.randn(n, v)
p = torch.softmax(logits, -1)
u = torch.rand(n, dtype=torch.float64)
out = {}
for name, fn in SAMPLERS.items():  # draw first: its scratch is the smallest, nothing freed is reused by it
    fn(p[:2].clone(), u[:2].clone(), logits[:2].clone())  # warm-up (first-call allocations)
    base = reset_peak()
    fn(p, u, logits)
    out[name] = peak_mib() - base
print(json.dumps(out))
"""


def sampler_rows(sizes: list[tuple[int, int]], repeats: int) -> list[dict]:
    """ms per call of each sampler at each N x V (interleaved medians)."""
    rows = []
    for n, v in sizes:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(n, v, generator=g)
        p = torch.softmax(logits, -1)
        u = torch.rand(n, generator=g, dtype=torch.float64)
        assert torch.equal(_draw(p, u, logits), draw_full_cumsum(p, u))  # the same tokens (no boundary ties here)
        sec = interleaved_medians({k: (lambda fn=fn: fn(p, u, logits)) for k, fn in SAMPLERS.items()}, repeats)
        rows.append({"N x V": f"{n} x {v}", **{f"{k} ms": 1e3 * s for k, s in sec.items()}})
    return rows


def scratch_mib(n: int, v: int) -> dict:
    """Peak resident MiB above the inputs of one call of each sampler at n x v, in a fresh process."""
    return peak_rss_mib(SCRATCH, str(n), str(v))


def run(quick: bool = False) -> Report:
    import transformers

    transformers.logging.set_verbosity_error()  # generate's notes on the settings passed
    repeats = 1 if quick else 3
    cases = (
        {"builtin": builtin_case(16, 16, ("debug=fast",)), "qwen2_vocab": qwen2_case(4, 16)}
        if quick
        else {"builtin": builtin_case(64, 48), "qwen2_vocab": qwen2_case(16, 64)}
    )
    rep = Report(
        "Rollout: rollout=sample's generate() vs model.generate; the keyed draw" + (" [quick]" if quick else "")
    )
    # the built-in model's calls are short (0.4 s): more repeats for the same time; even so, ~10% between two
    # runs of the same function is this shared machine's noise, not a difference
    reps = {"builtin": 1 if quick else 5, "qwen2_vocab": repeats}
    rows = [rollout_row(k, c, reps[k], extras=not quick) for k, c in cases.items()]
    at = (64, VOCAB) if quick else (256, VOCAB)
    sizes = [at] if quick else [(64, 101), (256, 101), (64, VOCAB), at]
    samplers = sampler_rows(sizes, repeats)
    scratch = scratch_mib(*at)
    rep.rows = rows
    head = next(r for r in samplers if r["N x V"] == f"{at[0]} x {at[1]}")
    rep.results = {
        "rollout_vs_generate": {r["model"]: r["ours / generate"] for r in rows},
        "rollout": rows,
        "sampler": {
            "at": f"{at[0]} x {at[1]}",
            "ms": {k: head[f"{k} ms"] for k in SAMPLERS},
            "scratch_mib": scratch,
            "all_sizes": samplers,
        },
    }
    ratio = rep.results["rollout_vs_generate"]
    rep.notes.append(
        f"tokens/s ratio rollout=sample / model.generate: builtin {ratio['builtin']:.2f}x, "
        f"Qwen2 vocabulary {ratio['qwen2_vocab']:.2f}x (target >= 1.0); medians of {reps['builtin']} / "
        f"{reps['qwen2_vocab']} interleaved repeats"
    )
    ms = rep.results["sampler"]["ms"]
    rep.notes.append(
        f"draw at {at[0]} x {at[1]}: {ms['draw']:.1f} ms (full cumsum {ms['full_cumsum']:.0f} ms, multinomial "
        f"{ms['multinomial']:.0f} ms, softmax alone {ms['softmax']:.1f} ms); scratch MiB {scratch}"
    )
    rep.notes.append("the samplers, ms per call:\n\n" + table(samplers))
    return rep


if __name__ == "__main__":
    cli(run)
