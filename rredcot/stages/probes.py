"""Answer-forcing probes scored by teacher forcing: log p(answer | trace[:b_k] + forcing text) for every
boundary b_k and every candidate answer of a trace.

A probe block is the forcing text, the answer and the closing text **tokenized together**, as the model
would see that text: with byte-level BPE, `\\boxed{` + `\\frac` is not the tokens of `\\boxed{` then the
tokens of `\\frac` (the model writes `{\\` + `frac`). The block's leading tokens that it shares with the
forcing text alone are context (`scored_from`); the rest are scored. Those may cover the last characters
of the forcing text: they are the same for every answer, so comparing answers stays fair.

Two paths give the same numbers (tests check they agree with one forward per probe):
- packed (short traces): the trace followed by every block in ONE forward, a 4-D mask letting block
  (k, a) see trace[:b_k] and itself causally, positions continuing from b_k. Its mask is S x S, so it is
  used while S = L + all blocks stays under `packed_max_tokens`.
- cached (long traces): one forward of the trace fills a KV cache; each block then runs on the cache
  cropped to its boundary (boundaries longest first, so cropping never loses what a later probe needs).
  Memory grows with L, not with S^2.
Only the rows that predict scored tokens go through the LM head (`logits_to_keep`): a 25k-token trace
with a 150k vocabulary no longer materialises gigabytes of logits to read a few hundred rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rredcot.logprobs import hidden_states, output_head, selective_log_softmax
from rredcot.stages.probe_layout import Query, build_query, packed_layout, scores
from rredcot.stages.rollout import cache_kwarg, forward_takes
from rredcot.types import RolloutKV


@dataclass(frozen=True)
class ProbeItem:
    """One trace's probes: trace_ids [L]; boundaries (prefix lengths into trace_ids, >= 1); per answer its
    block ids (forcing text + answer + closing, tokenized together) and scored_from (leading block
    tokens that are context only). `own`: instead of the shared blocks, each boundary's own list of
    (block, scored_from), all of one length (a reference solution's remaining steps differ per boundary)."""

    trace_ids: torch.Tensor
    boundaries: list[int]
    blocks: list[torch.Tensor]
    scored_from: list[int]
    own: list[list[tuple[torch.Tensor, int]]] | None = None
    row: int | None = None  # the rollout row it came from (its trace may be in the rollout's KV cache)

    def at(self, k: int) -> list[tuple[torch.Tensor, int]]:
        """The probes after boundary k: [(block ids, scored_from)] in answer order."""
        return self.own[k] if self.own is not None else list(zip(self.blocks, self.scored_from))

    @property
    def width(self) -> int:
        """|A|: probes per boundary."""
        return len(self.own[0]) if self.own else len(self.blocks)

    @classmethod
    def from_parts(cls, trace_ids, boundaries, force_ids, answers) -> "ProbeItem":
        """Blocks of separately tokenized forcing text and answers (a character tokenizer, or tests)."""
        return cls(
            trace_ids, list(boundaries), [torch.cat([force_ids, a]) for a in answers], [len(force_ids)] * len(answers)
        )

    @property
    def probe_tokens(self) -> int:
        return sum(len(blk) for k in range(len(self.boundaries)) for blk, _ in self.at(k))

    @property
    def packed_tokens(self) -> int:
        return len(self.trace_ids) + self.probe_tokens


def _queries(item: ProbeItem, cached: int | None, budget: int, columns: int) -> list[tuple[int, Query]]:
    """item's Query (cached: the trace tokens a cache of `columns` columns holds), split by boundaries into
    pieces whose mask (Q x (columns + Q)) stays within `budget` elements: [(first boundary, Query)]."""
    K, out, k0 = len(item.boundaries), [], 0
    per = max(1, item.probe_tokens // max(K, 1))  # probe tokens per boundary
    step = max(1, min(K, budget // max(per * (columns + item.probe_tokens), 1))) if cached is not None else K
    step = -(-K // -(-K // step)) if K else 1  # pieces of even size (124 + 4 boundaries would pad 4 to 124)
    while k0 < K:
        part = replace(
            item,
            boundaries=item.boundaries[k0 : k0 + step],
            own=None if item.own is None else item.own[k0 : k0 + step],
        )
        out.append((k0, build_query(part, cached)))
        k0 += step
    return out


HEAD_ROWS = 256  # rows projected to the vocabulary at a time: 256 x 151,936 fp32 logits = 156 MB
WASTE = 3  # a rollout-cache forward pads its rows' queries to the longest: at most this many times their tokens


def _token_logprobs(model, ids, pos, allowed, preds, tgts, temperature: float, **kw) -> list[torch.Tensor]:
    """One no-grad forward of ids [B, Q] with a custom 4-D mask (allowed [B, 1, Q, keys] bool); per row i the
    log-probs [M_i] of tokens tgts[i] at the positions preds[i] that predict them. Each distinct (row, position)
    is projected to the vocabulary once, HEAD_ROWS at a time (its log-normaliser shared by every token it predicts)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min).to(device)
    uniq = [torch.unique(p, return_inverse=True) for p in preds]  # per row: (positions [U_i], index of each [M_i])
    rows = torch.cat([torch.full((len(u),), i) for i, (u, _) in enumerate(uniq)])  # [U]
    where = torch.cat([u for u, _ in uniq])  # [U]
    offsets = torch.tensor([0] + [len(u) for u, _ in uniq]).cumsum(0)
    pair = torch.cat([inv + offsets[i] for i, (_, inv) in enumerate(uniq)]).to(device)  # [M] each token's pair
    target = torch.cat(tgts).to(device)  # [M]
    inputs = dict(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask, **kw)
    head = output_head(model)  # the update's mechanism (rredcot/logprobs.py): the forward with lm_head swapped out
    hidden = None if head is None else hidden_states(model, head, lambda m: m(**inputs).logits)[0]
    if hidden is not None:  # [B, Q, H]: only the pairs a probe reads go through lm_head (and its post-processing)
        hidden = hidden[rows.to(device), where.to(device)]  # [U, H]

        def project(h):
            return head.module(h) if head.transform is None else head.transform(head.module(h))
    else:  # the model's own logits, at the union of the rows' positions
        keep = torch.unique(where)
        extra = {"logits_to_keep": keep.to(device)} if forward_takes(model, "logits_to_keep") else {}
        logits = model(**inputs, **extra).logits  # [B, len(keep), V]
        hidden = logits[rows.to(device), torch.searchsorted(keep, where).to(device)]  # [U, V]
        project = None
    out = torch.empty(len(target), device=device)
    for lo in range(0, len(where), HEAD_ROWS):
        lg = hidden[lo : lo + HEAD_ROWS]
        lg = (project(lg) if project is not None else lg.clone()).float()  # [c, V], a tensor of its own
        if temperature != 1.0:
            lg.div_(temperature)  # in place: no second [c, V] copy
        sel = ((pair >= lo) & (pair < lo + HEAD_ROWS)).nonzero().squeeze(-1)
        r = pair[sel] - lo
        out[sel] = lg[r, target[sel]] - torch.logsumexp(lg, -1)[r]
    return list(out.cpu().split([len(t) for t in tgts]))


@torch.no_grad()
def probe_logprobs_batch(model, items: list[ProbeItem], temperature: float = 1.0) -> list[torch.Tensor]:
    """Packed path for several traces in one forward: per item a [K+1, |A|] tensor of summed log-probs."""
    queries = [build_query(it) for it in items]
    layouts = [packed_layout(it, q) for it, q in zip(items, queries)]
    S, B = max(len(lay[0]) for lay in layouts), len(items)
    ids = torch.zeros(B, S, dtype=torch.long)
    pos = torch.zeros(B, S, dtype=torch.long)
    allowed = torch.zeros(B, 1, S, S, dtype=torch.bool)
    for i, (x, p, a, _) in enumerate(layouts):
        n = len(x)
        ids[i, :n], pos[i, :n], allowed[i, 0, :n, :n] = x, p, a
        allowed[i, 0, n:, 0] = True  # padding rows attend to something, so softmax stays finite
    tgts = [q.ids[q.targets] for q in queries]
    got = _token_logprobs(model, ids, pos, allowed, [lay[3] for lay in layouts], tgts, temperature)
    return [scores(g, q, it.width) for g, q, it in zip(got, queries, items)]


def _crop(cache, length: int) -> None:
    """Keep the first `length` positions (a negative count removes tokens in transformers 4 and 5 alike)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def _on_cache(model, cache, rows: list[tuple[Query, int]], temperature: float, widths: list[int]) -> list[torch.Tensor]:
    """One forward of several rows' queries on a KV cache of as many rows ([B, heads, C, d] per layer); row i's
    trace position j is cache column starts[i] + j. rows: (Query, start) per cache row. The cache is cropped
    back to its C columns afterwards (it may be read again)."""
    C, B = cache.get_seq_length(), len(rows)
    Qm = max(len(q.ids) for q, _ in rows)
    ids = torch.zeros(B, Qm, dtype=torch.long)
    pos = torch.zeros(B, Qm, dtype=torch.long)
    allowed = torch.zeros(B, 1, Qm, C + Qm, dtype=torch.bool)
    cols = torch.arange(C)
    for i, (q, start) in enumerate(rows):
        n = len(q.ids)
        ids[i, :n], pos[i, :n] = q.ids, q.pos
        allowed[i, 0, :n, :C] = (cols[None, :] >= start) & (cols[None, :] < start + q.prefix[:, None])
        allowed[i, 0, :n, C : C + n] = q.visible()
        pad = torch.arange(n, Qm)
        allowed[i, 0, pad, C + pad] = True  # padding rows attend to themselves, so softmax stays finite
    preds, tgts = [q.predictors for q, _ in rows], [q.ids[q.targets] for q, _ in rows]  # cached: predictors >= 0
    try:
        kw = {"use_cache": True, cache_kwarg(model): cache}
        got = _token_logprobs(model, ids, pos, allowed, preds, tgts, temperature, **kw)
    finally:
        _crop(cache, C)
    return [scores(g, q, w) for g, (q, _), w in zip(got, rows, widths)]


@torch.no_grad()
def probe_logprobs_cached(model, item: ProbeItem, temperature: float = 1.0, budget: int = 1 << 26) -> torch.Tensor:
    """Cached path for one (long) trace: one forward of the trace fills a KV cache (no logits but the last),
    then every probe runs on it, in as few forwards as keep the mask within `budget` elements: [K+1, |A|],
    the same numbers as the packed path. Memory grows with L, not with S^2."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache, L = DynamicCache(), len(item.trace_ids)
    model(input_ids=item.trace_ids.to(device)[None], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    parts = [_on_cache(model, cache, [(q, 0)], temperature, [item.width])[0] for _, q in _queries(item, L, budget, L)]
    return torch.cat(parts)


def _usable(model, kv: list[RolloutKV] | None) -> bool:
    """Whether the rollout's caches can serve this model's probes: filled by this very model (a lagged critic is
    another), every layer a full-length cache (a sliding-window layer has dropped the trace's start)."""
    if not kv or any(c.model is not model for c in kv):
        return False
    return all(type(layer).__name__ == "DynamicLayer" for c in kv for layer in getattr(c.cache, "layers", [None]))


def _rows_of(cache, rows: list[int]):
    """A DynamicCache of some of the cache's rows (a copy: the probe forward appends to it)."""
    from transformers import DynamicCache

    sub, index = DynamicCache(), torch.tensor(rows, device=cache.layers[0].keys.device)
    for i, layer in enumerate(cache.layers):
        sub.update(layer.keys.index_select(0, index), layer.values.index_select(0, index), i)
    return sub


def _on_rollout_cache(model, items, kv, out, temperature: float, budget: int, max_tokens: int) -> set[int]:
    """Scores (into `out`) the items whose row's trace is in the rollout's KV cache; returns their indices."""
    if not _usable(model, kv):
        return set()
    done: set[int] = set()
    for c in kv:
        C, n = c.cache.get_seq_length(), len(c.starts)
        mine = [i for i, it in enumerate(items) if it.row is not None and c.lo <= it.row < c.lo + n]
        pieces = [  # (item, first boundary, cache row, Query)
            (i, k0, items[i].row - c.lo, q)
            for i in mine
            for k0, q in _queries(items[i], c.held[items[i].row - c.lo], budget, C)
        ]
        parts: dict[int, list[tuple[int, torch.Tensor]]] = {i: [] for i in mine}
        for batch in _batches(pieces, C, budget, max_tokens):
            rows = [r for _, _, r, _ in batch]
            cache = c.cache if rows == list(range(n)) else _rows_of(c.cache, rows)
            got = _on_cache(
                model,
                cache,
                [(q, c.starts[r]) for _, _, r, q in batch],
                temperature,
                [items[i].width for i, _, _, _ in batch],
            )
            for (i, k0, _, _), g in zip(batch, got):
                parts[i].append((k0, g))
        for i in mine:
            out[i] = torch.cat([g for _, g in sorted(parts[i], key=lambda p: p[0])])
        done.update(mine)
    return done


def _batches(pieces, C: int, budget: int, max_tokens: int):
    """Consecutive pieces grouped into forwards: rows x Q_max x (C + Q_max) mask elements within `budget`,
    query tokens within `max_tokens`, and padding at most WASTE x the real query tokens (rows are padded to Q_max)."""
    batch, qmax, tokens = [], 0, 0
    for p in pieces:
        q = len(p[3].ids)
        wider = max(qmax, q)
        full = (len(batch) + 1) * wider * (C + wider) > budget or tokens + q > max_tokens
        if batch and (full or (len(batch) + 1) * wider > WASTE * (tokens + q)):
            yield batch
            batch, wider, tokens = [], q, 0
        batch.append(p)
        qmax, tokens = wider, tokens + q
    if batch:
        yield batch


def score_items(
    model,
    items: list[ProbeItem],
    temperature: float = 1.0,
    max_batch_tokens: int = 16384,
    packed_max_tokens: int = 8192,
    kv: list[RolloutKV] | None = None,
) -> list[torch.Tensor]:
    """Each item's [K+1, |A|] log-probs, in order. Items of rows whose trace the rollout's KV cache holds
    (`kv`, filled by this same model) are scored on it: only their probe tokens are forwarded. Others whose
    packed sequence fits `packed_max_tokens` go packed, several per forward up to `max_batch_tokens`; longer
    ones through a KV cache of their own."""
    out: list[torch.Tensor | None] = [None] * len(items)
    cached = _on_rollout_cache(model, items, kv, out, temperature, packed_max_tokens**2, max_batch_tokens)
    rest = [i for i in range(len(items)) if i not in cached]
    chunk, size = [], 0

    def flush():
        for i, s in zip(chunk, probe_logprobs_batch(model, [items[j] for j in chunk], temperature)):
            out[i] = s

    for i in rest:
        it = items[i]
        if it.packed_tokens > packed_max_tokens:
            out[i] = probe_logprobs_cached(model, it, temperature, budget=packed_max_tokens**2)
            continue
        if chunk and size + it.packed_tokens > max_batch_tokens:
            flush()
            chunk, size = [], 0
        chunk.append(i)
        size += it.packed_tokens
    if chunk:
        flush()
    return out


def probe_logprobs(
    model,
    trace_ids: torch.Tensor,
    boundaries: list[int],
    force_ids: torch.Tensor,
    answers: list[torch.Tensor],
    temperature: float = 1.0,
) -> torch.Tensor:
    """[K+1, len(answers)]: summed log-prob of each answer's tokens given trace_ids[:b] + force_ids, for
    every boundary b, computed in one packed forward.

    Example: trace "a=3. a=?\\n<think>\\na=3\\n" with boundaries [9, 13], force "</think>\\n" and answers
    ["3</s>", "4</s>"] gives a 2 x 2 table; row 1 (after the line 'a=3') should favour "3".
    """
    item = ProbeItem.from_parts(trace_ids.cpu(), boundaries, force_ids.cpu(), [a.cpu() for a in answers])
    return probe_logprobs_batch(model, [item], temperature)[0]


@torch.no_grad()
def probe_logprobs_reference(model, item: ProbeItem, temperature: float = 1.0) -> torch.Tensor:
    """The slow path: one forward per probe, full logits. Same output as the two fast paths (for tests)."""
    device = next(model.parameters()).device
    out = torch.zeros(len(item.boundaries), item.width)
    for k, b in enumerate(item.boundaries):
        for j, (blk, s0) in enumerate(item.at(k)):
            seq = torch.cat([item.trace_ids[:b], blk]).to(device)
            logits = model(input_ids=seq[None]).logits[0].float() / temperature
            start = b + s0
            out[k, j] = selective_log_softmax(logits[start - 1 : len(seq) - 1], seq[start:]).sum().cpu()
    return out
