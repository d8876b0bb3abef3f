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
Also timed, on the same batches: `proposed`, a private copy of generate's loop with the change this benchmark
proposes for it (its tokens, log-probs and entropies bitwise equal to generate's: checked, `proposed bitwise`);
full run: `proposed_p`, the same with the entropy taken from the draw's softmax (not bitwise: `proposed_p
entropy diff`), and on the Qwen2 vocabulary `before`, generate with the full-cumsum draw issue 23 replaced.

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


def ours(case: dict, fn=None, **kw) -> int:
    """rollout=sample's generate() (or `fn`, a copy of it): the tokens in its completion mask."""
    from rredcot.stages.rollout import generate

    out = (fn or generate)(
        case["model"],
        case["ids"],
        case["mask"],
        eos_id=case["stops"],
        pad_id=case["pad"],
        max_new_tokens=case["T"],
        uniforms=case["u"],
        **kw,
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


# ---- the proposed decode loop (a private copy of rollout.generate; rollout.py is not edited here) ----


@torch.no_grad()
def generate_proposed(
    model,
    prompt_ids,
    prompt_mask,
    *,
    eos_id,
    pad_id,
    max_new_tokens,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    greedy=False,
    uniforms=None,
    keep_cache=False,
    entropy_from_probs=False,
):
    """rollout.generate (as of issue 23) with three [N, V] passes and two [N, V] allocations fewer per token,
    the same tokens, log-probs and entropies bitwise (same_as_generate checks it):
    - the entropy reuses the step's log_softmax (entropy_from_logits(scaled) computed a second one);
    - its exp(logp) goes into one scratch reused by every step and is multiplied in place (fresh [N, V]
      tensors of 10 MB are fresh pages: measured 2x the cost of the arithmetic on this machine, torch 2.13);
    - logits are not divided by a temperature of 1 (x / 1.0 is x; the division is a copy).
    entropy_from_probs (not bitwise: entropies within ~1e-6 relative): unfiltered sampling takes the entropy's
    p from the draw's softmax instead of exp(logp), one exp pass fewer."""
    from rredcot.logprobs import position_ids
    from rredcot.stages.rollout import cache_kwarg
    from rredcot.stages.sampling import draw, filter_logits

    n = prompt_ids.shape[0]
    mask = prompt_mask.clone()
    pos = position_ids(mask)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers 5 / 4
    done = torch.zeros(n, dtype=torch.bool, device=prompt_ids.device)
    stops = torch.tensor(eos_id if isinstance(eos_id, (list, tuple)) else [eos_id], device=prompt_ids.device)
    kw = cache_kwarg(model)
    toks, alive, logps, ents = [], [], [], []
    pos = pos[:, -1:]
    div = 1.0 if greedy else temperature
    p_logp = None  # [N, V] scratch: p * log p of the step
    for t in range(max_new_tokens):
        scaled = out.logits[:, -1].float()  # [N, V]; a no-op for an fp32 model
        scaled = scaled if div == 1.0 else scaled / div
        logp_all = torch.log_softmax(scaled, dim=-1)  # [N, V]
        probs = None
        if greedy:
            tok = scaled.argmax(-1)
        else:
            filtered = filter_logits(scaled, top_k, top_p)  # `scaled` itself when nothing is filtered
            probs = torch.softmax(filtered, dim=-1)
            u = uniforms[:, len(toks)] if uniforms is not None else torch.rand(n, device=probs.device)
            tok = draw(probs, u)  # [N]
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        toks.append(tok)
        alive.append(~done)
        logps.append(logp_all.gather(-1, tok[:, None]).squeeze(-1))
        if entropy_from_probs and probs is not None and filtered is scaled:
            ents.append(-(probs * logp_all).sum(-1))
        else:  # entropy_from_logits(scaled): -(exp(logp) * logp).sum(-1), its log_softmax and scratch reused
            p_logp = torch.exp(logp_all, out=p_logp if p_logp is not None else torch.empty_like(logp_all))
            ents.append(-p_logp.mul_(logp_all).sum(-1))
        done = done | torch.isin(tok, stops)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache})
    completion_mask = torch.stack(alive, 1).long()  # [N, T]
    logprobs = torch.stack(logps, 1) * completion_mask
    entropies = torch.stack(ents, 1) * completion_mask
    out = (torch.stack(toks, 1), completion_mask, logprobs, entropies, ~done)
    return (*out, cache, len(toks) - 1) if keep_cache else out


def against_generate(case: dict, **kw) -> dict:
    """generate_proposed's outputs against generate's: bitwise equal, and the largest entropy difference."""
    from rredcot.stages.rollout import generate

    args = (case["model"], case["ids"], case["mask"])
    opts = {"eos_id": case["stops"], "pad_id": case["pad"], "max_new_tokens": case["T"], "uniforms": case["u"]}
    ref, got = generate(*args, **opts), generate_proposed(*args, **opts, **kw)
    return {
        "bitwise": all(torch.equal(a, b) for a, b in zip(ref, got)),
        "entropy_max_diff": float((ref[3] - got[3]).abs().max()),
    }


# ---- measurements ----


def rollout_row(name: str, case: dict, repeats: int, extras: bool) -> dict:
    """Tokens/s of each sampler on `case`, interleaved. extras: also generate_proposed with entropy_from_probs
    (`proposed_p`) and, above DRAW_BLOCK tokens (below it draw runs the old code), generate with the
    full-cumsum draw (`before`)."""
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
        "proposed": timed("proposed", lambda: ours(case, generate_proposed)),
    }
    if extras:
        fns["proposed_p"] = timed("proposed_p", lambda: ours(case, generate_proposed, entropy_from_probs=True))
    if extras and case["model"].config.vocab_size > DRAW_BLOCK:
        fns["before"] = timed("before", before)
    sec = interleaved_medians(fns, repeats=repeats)
    rate = {k: counts[k] / sec[k] for k in fns}
    row = {"model": name, "rows x new": f"{case['ids'].shape[0]} x {case['T']}"}
    row |= {f"{k} tok/s": rate[k] for k in fns}
    row |= {"ours tokens": counts["ours"], "generate tokens": counts["generate"]}
    row["ours / generate"] = rate["ours"] / rate["generate"]
    row |= {f"{k} / ours": rate[k] / rate["ours"] for k in fns if k not in ("ours", "generate")}
    row["proposed bitwise"] = against_generate(case)["bitwise"]
    if extras:
        row["proposed_p entropy diff"] = against_generate(case, entropy_from_probs=True)["entropy_max_diff"]
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
        "proposed_loop_speedup": {r["model"]: r["proposed / ours"] for r in rows},
        "proposed_loop_bitwise": all(r["proposed bitwise"] for r in rows),
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
