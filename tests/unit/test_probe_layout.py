"""The probe tree (stages/probe_layout.py) and the probes scored on the rollout's own KV cache: shared forcing
tokens are forwarded once per boundary, and every path gives the numbers of one forward per probe."""

import pytest
import torch
from omegaconf import OmegaConf

from rredcot.stages import probes
from rredcot.stages.probe_layout import build_query, packed_layout
from rredcot.stages.probes import ProbeItem, probe_logprobs_cached, probe_logprobs_reference, score_items
from rredcot.stages.rollout import KVCacheBackend, Sampling
from rredcot.task.model import build_tiny, load_tokenizer

TOK = load_tokenizer("builtin")
T = torch.tensor


def test_the_shared_forcing_token_is_forwarded_once_and_branches_do_not_see_each_other():
    # trace [7 8 9], boundary 2, blocks [5 1] and [5 2], scored from 1 (the forcing token 5 is context)
    item = ProbeItem(T([7, 8, 9]), [2], [T([5, 1]), T([5, 2])], [1, 1])
    q = build_query(item)
    assert q.ids.tolist() == [5, 1, 2] and q.pos.tolist() == [2, 3, 3] and q.prefix.tolist() == [2, 2, 2]
    assert q.targets.tolist() == [1, 2] and q.predictors.tolist() == [0, 0]  # both answers read 5's logits
    assert q.visible().tolist() == [[True, False, False], [True, True, False], [True, False, True]]
    ids, pos, allowed, pred = packed_layout(item, q)
    assert ids.tolist() == [7, 8, 9, 5, 1, 2] and pos.tolist() == [0, 1, 2, 2, 3, 3]
    assert allowed[3:, :3].tolist() == [[True, True, False]] * 3  # trace[:2], not the token after the boundary
    assert pred.tolist() == [3, 3]


def test_a_first_scored_token_reads_the_prefix_or_refeeds_it_on_a_cache():
    # no forcing text (scored_from 0): the first answer token is predicted by trace[b - 1]
    item = ProbeItem(T([7, 8, 9]), [2], [T([1]), T([2])], [0, 0])
    packed = build_query(item)
    assert packed.ids.tolist() == [1, 2] and packed.predictors.tolist() == [-2, -2]  # trace index 1 = -(-2) - 1
    cached = build_query(item, cached=3)  # the cache holds the trace, but no logits: trace[1] is fed again
    assert cached.ids.tolist() == [8, 1, 2] and cached.pos.tolist() == [1, 2, 2] and cached.prefix.tolist() == [1] * 3
    assert cached.predictors.tolist() == [0, 0] and cached.targets.tolist() == [1, 2]
    short = build_query(ProbeItem(T([7, 8, 9]), [3], [T([5, 1])], [1]), cached=2)  # trace[2] never reached the cache
    assert short.ids.tolist() == [9, 5, 1] and short.pos.tolist() == [2, 3, 4] and short.predictors.tolist() == [1]


def _model(arch):
    cfg = OmegaConf.create(
        {"arch": arch, "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "max_positions": 256}
    )
    return build_tiny(cfg, len(TOK), seed=3).eval()


def _ids(text):
    return T(TOK(text, add_special_tokens=False)["input_ids"])


def _rollout(model, prompts, budget):
    """The sampler's own output and caches for left-padded prompts (rows of unequal prompt length)."""
    enc = TOK(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    gen = KVCacheBackend(model, TOK, chunk_size=2).generate(
        enc["input_ids"], enc["attention_mask"], Sampling(budget), keep_kv=True
    )
    traces = []
    for i in range(len(prompts)):
        p = enc["input_ids"][i][enc["attention_mask"][i].bool()]
        traces.append((torch.cat([p, gen.ids[i, : int(gen.mask[i].sum())]]), len(p)))
    return gen, traces


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_probes_on_the_rollouts_cache_equal_one_forward_per_probe(arch, monkeypatch):
    model = _model(arch)
    prompts = ["a=3. a=?\n<think>\n", "a=3, b=a+4, c=b*2. c=?\n<think>\n", "x=1. x=?\n<think>\n"]
    gen, traces = _rollout(model, prompts, budget=12)  # a random model: most rows run to the budget
    assert len(gen.kv) == 2 and gen.truncated.any()  # chunks of 2 rows; a truncated row's last token is not cached
    force, answers = _ids("</think>\n"), [_ids("14</s>"), _ids("13</s>"), _ids("140</s>")]
    items = []
    for row, (ids, plen) in enumerate(traces):
        bounds = [plen, plen + 3, len(ids)]  # the prompt alone, mid-trace, the whole trace
        # row 1 has no forcing text: its first answer token is predicted by the prefix's last token (re-fed)
        f = torch.zeros(0, dtype=torch.long) if row == 1 else force
        blocks = [torch.cat([f, a]) for a in answers[: 1 + row]]
        items.append(ProbeItem(ids, bounds, blocks, [len(f)] * len(blocks), row=row))
    widths = [c.cache.get_seq_length() for c in gen.kv]
    refs = [probe_logprobs_reference(model, it) for it in items]

    def no_trace_forward(*a, **k):
        raise AssertionError("a trace was forwarded again")

    monkeypatch.setattr(probes, "probe_logprobs_batch", no_trace_forward)  # the cache serves every probe
    monkeypatch.setattr(probes, "probe_logprobs_cached", no_trace_forward)
    for budget in (1 << 26, 40):  # one forward per cache; then a mask budget that splits every query by boundaries
        got = score_items(model, items, packed_max_tokens=int(budget**0.5), kv=gen.kv)
        assert all(torch.allclose(g, r, atol=1e-4) for g, r in zip(got, refs))
    sub = score_items(model, items[1:], kv=gen.kv)  # a subset of a cache's rows (copied out)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(sub, got[1:]))
    assert [c.cache.get_seq_length() for c in gen.kv] == widths  # cropped back after every probe forward


def test_another_model_does_not_read_the_cache():
    model, other = _model("llama"), _model("qwen2")
    gen, traces = _rollout(model, ["a=3. a=?\n<think>\n"], budget=6)
    ids, plen = traces[0]
    item = ProbeItem(ids, [plen, len(ids)], [_ids("</think>\n3</s>")], [2], row=0)
    got = score_items(other, [item], kv=gen.kv)[0]  # a lagged critic: its own forward, not the policy's cache
    assert torch.allclose(got, probe_logprobs_reference(other, item), atol=1e-4)


def test_the_cached_path_splits_long_queries_and_keeps_their_order():
    model = _model("qwen2")
    ids = _ids("a=3, b=a+4, c=b*2. c=?\n<think>\nb=3+4=7\nc=7*2=14\n</think>\n14</s>")
    item = ProbeItem.from_parts(ids, [5, 12, 21, 30, 39], _ids("</think>\n"), [_ids("14</s>"), _ids("7</s>")])
    ref = probe_logprobs_reference(model, item)
    assert torch.allclose(probe_logprobs_cached(model, item, budget=600), ref, atol=1e-4)  # several forwards


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_model_whose_head_is_not_plain_goes_through_its_own_forward(arch, monkeypatch):
    # a model whose post-processing of lm_head's output rredcot/logprobs.py cannot reproduce is scored from its
    # own forward's logits (at the union of the rows' positions), not from lm_head(hidden states)
    model = _model(arch)
    ids = _ids("a=3, b=a+4. b=?\n<think>\nb=3+4=7\n</think>\n7</s>")
    items = [
        ProbeItem.from_parts(ids[: 20 + i], [9, 20], _ids("</think>\n"), [_ids("7</s>"), _ids("8</s>")]) for i in (0, 5)
    ]
    fast = score_items(model, items)
    monkeypatch.setattr(probes, "output_head", lambda model: None)  # as rredcot.logprobs says of such a model
    slow = score_items(model, items)
    for it, a, b in zip(items, fast, slow):
        ref = probe_logprobs_reference(model, it)
        assert torch.allclose(a, ref, atol=1e-4) and torch.allclose(b, ref, atol=1e-4)


def test_past_its_budget_the_sampler_keeps_no_cache_and_the_probes_reforward():
    model = _model("llama")
    enc = TOK(["a=3. a=?\n<think>\n"] * 2, return_tensors="pt", padding=True, add_special_tokens=False)
    backend = KVCacheBackend(model, TOK, chunk_size=1, kv_keep_gb=0.0)  # rollout.kv_keep_gb=0: nothing is kept
    gen = backend.generate(enc["input_ids"], enc["attention_mask"], Sampling(4), keep_kv=True)
    assert gen.kv is None
    backend.kv_keep_gb = 1.0
    assert len(backend.generate(enc["input_ids"], enc["attention_mask"], Sampling(4), keep_kv=True).kv) == 2
