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

from dataclasses import dataclass

import torch

from rredcot.logprobs import selective_log_softmax
from rredcot.stages.rollout import cache_kwarg, forward_takes


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


def _layout(item: ProbeItem):
    """ids [S], positions [S], allowed [S, S] bool, and per probe (k, a): (scored indices, predictor indices)."""
    L = len(item.trace_ids)
    ids, pos, spans = [item.trace_ids], [torch.arange(L)], []
    start = L
    for k, b in enumerate(item.boundaries):
        for blk, s0 in item.at(k):
            ids.append(blk)
            pos.append(torch.arange(b, b + len(blk)))
            spans.append((start, len(blk), b, s0))
            start += len(blk)
    allowed = torch.zeros(start, start, dtype=torch.bool)
    allowed[:L, :L] = torch.ones(L, L, dtype=torch.bool).tril()
    targets, predictors = [], []
    for s, n, b, s0 in spans:
        allowed[s : s + n, :b] = True  # the trace prefix
        allowed[s : s + n, s : s + n] = torch.ones(n, n, dtype=torch.bool).tril()  # itself, causally
        tgt = torch.arange(s + s0, s + n)
        prd = tgt - 1
        if s0 == 0:
            prd[0] = b - 1  # the first scored token is predicted by the last token of the prefix
        targets.append(tgt)
        predictors.append(prd)
    return torch.cat(ids), torch.cat(pos), allowed, targets, predictors


@torch.no_grad()
def probe_logprobs_batch(model, items: list[ProbeItem], temperature: float = 1.0) -> list[torch.Tensor]:
    """Packed path for several traces in one forward: per item a [K+1, |A|] tensor of summed log-probs."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    layouts = [_layout(it) for it in items]
    S, B = max(len(lay[0]) for lay in layouts), len(items)
    ids = torch.zeros(B, S, dtype=torch.long)
    pos = torch.zeros(B, S, dtype=torch.long)
    allowed = torch.zeros(B, 1, S, S, dtype=torch.bool)
    for i, (x, p, a, _, _) in enumerate(layouts):
        n = len(x)
        ids[i, :n], pos[i, :n], allowed[i, 0, :n, :n] = x, p, a
        allowed[i, 0, n:, 0] = True  # padding rows attend to something, so softmax stays finite
    mask = torch.zeros(B, 1, S, S, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    keep = torch.unique(torch.cat([torch.cat(lay[4]) for lay in layouts]))  # [P] rows any probe reads
    extra = {"logits_to_keep": keep.to(device)} if forward_takes(model, "logits_to_keep") else {}
    logits = model(
        input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device), **extra
    ).logits
    column = torch.full((S,), -1, dtype=torch.long)
    column[keep] = torch.arange(len(keep))
    out = []
    for i, (x, _, _, targets, predictors) in enumerate(layouts):
        rows = [column[prd] if extra else prd for prd in predictors]
        scores = [
            selective_log_softmax(logits[i, r.to(device)].float() / temperature, x[t].to(device)).sum()
            for t, r in zip(targets, rows)
        ]
        out.append(torch.stack(scores).view(len(items[i].boundaries), items[i].width).cpu())
    return out


def _crop(cache, length: int) -> None:
    """Keep the first `length` positions (a negative count removes tokens in transformers 4 and 5 alike)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def probe_logprobs_cached(model, item: ProbeItem, temperature: float = 1.0) -> torch.Tensor:
    """Cached path for one (long) trace: [K+1, |A|], the same numbers as the packed path."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    trace = item.trace_ids.to(device)
    cache, kw = DynamicCache(), cache_kwarg(model)
    model(input_ids=trace[None], use_cache=True, logits_to_keep=1, **{kw: cache})
    out = torch.zeros(len(item.boundaries), item.width)
    for k in sorted(range(len(item.boundaries)), key=lambda k: -item.boundaries[k]):
        b = item.boundaries[k]
        for j, (blk, s0) in enumerate(item.at(k)):
            _crop(cache, b - 1)  # re-feed the prefix's last token: it predicts the first answer token when s0 == 0
            seq = torch.cat([trace[b - 1 : b], blk.to(device)])
            logits = (
                model(
                    input_ids=seq[None],
                    position_ids=torch.arange(b - 1, b - 1 + len(seq), device=device)[None],
                    use_cache=True,
                    **{kw: cache},
                )
                .logits[0]
                .float()
                / temperature
            )
            out[k, j] = selective_log_softmax(logits[s0 : len(seq) - 1], seq[s0 + 1 :]).sum().cpu()
    return out


def score_items(
    model,
    items: list[ProbeItem],
    temperature: float = 1.0,
    max_batch_tokens: int = 16384,
    packed_max_tokens: int = 8192,
):
    """Yields each item's [K+1, |A|] log-probs in order: items whose packed sequence fits
    `packed_max_tokens` go packed, several per forward up to `max_batch_tokens`; longer ones cached."""
    chunk, size = [], 0
    for it in items:
        if it.packed_tokens > packed_max_tokens:
            if chunk:
                yield from probe_logprobs_batch(model, chunk, temperature)
                chunk, size = [], 0
            yield probe_logprobs_cached(model, it, temperature)
            continue
        if chunk and size + it.packed_tokens > max_batch_tokens:
            yield from probe_logprobs_batch(model, chunk, temperature)
            chunk, size = [], 0
        chunk.append(it)
        size += it.packed_tokens
    if chunk:
        yield from probe_logprobs_batch(model, chunk, temperature)


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
