"""Where every probe token of one trace goes in the probe forward, and what it may attend to (pure functions).

One trace's probes are a small tree per boundary b_k: the tokens its answers' blocks share (the forcing
text, and any leading answer tokens they have in common) once, then each answer's own remaining tokens as
a branch that sees the shared part. With a 14-token forcing text and |A| = 4 answers of 4 tokens this is
14 + 16 tokens per boundary instead of 4 x 18: the forcing text is scored once, not once per answer.

The query (every probe token of a trace, boundary after boundary) attends to a prefix of the trace that is
either in the same sequence in front of it (`packed`) or in a KV cache (`cached`: the rollout's, or one
prefill). In the cached layout a boundary whose prefix the cache does not hold in full, or whose first
scored token is predicted by the prefix's last token, re-feeds the missing trace tokens at the head of its
shared span (at most one token with the rollout's cache: its last sampled token is never fed).

Example (packed): trace [t0 t1 t2], boundary 2, blocks [f a] and [f b] (f the forcing token, scored_from 1)
-> query [f a b], positions [2 3 3], each query token sees trace[:2]; `a` and `b` see `f`, not each other;
scored: a predicted by f, b predicted by f.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Query:
    """The probe tokens of one trace: Q query tokens, M scored tokens, n_probes = (K+1) x |A| probes."""

    ids: torch.Tensor  # [Q] token ids
    pos: torch.Tensor  # [Q] position ids (the trace's own positions continue from each boundary)
    prefix: torch.Tensor  # [Q] each token sees trace[:prefix] (packed: in front; cached: in the cache)
    span: torch.Tensor  # [Q] the span each token belongs to
    parent: torch.Tensor  # [n_spans] the span a span's tokens also see in full (-1: none)
    targets: torch.Tensor  # [M] query index of each scored token
    predictors: torch.Tensor  # [M] query index of the token whose logits predict it; < 0: trace index -p - 1
    owner: torch.Tensor  # [M] the probe k * |A| + a each scored token belongs to
    n_probes: int

    def visible(self) -> torch.Tensor:
        """[Q, Q] bool: query token q may attend to query token u (same span causally, or u in q's parent span)."""
        q = torch.arange(len(self.ids))
        same = (self.span[:, None] == self.span[None, :]) & (q[:, None] >= q[None, :])
        return same | (self.parent[self.span][:, None] == self.span[None, :])


def _lcp(blocks: list[list[int]]) -> int:
    """Length of the longest common prefix of the blocks."""
    n = min(len(b) for b in blocks)
    m = 0
    while m < n and all(b[m] == blocks[0][m] for b in blocks[1:]):
        m += 1
    return m


def build_query(item, cached: int | None = None) -> Query:
    """The Query of a ProbeItem. cached None: packed (the whole trace precedes the query); else the number of
    the trace's leading tokens a KV cache holds (a boundary past it re-feeds the rest)."""
    trace = item.trace_ids.tolist()
    ids, pos, prefix, span, parent, tgt, prd, own = [], [], [], [], [], [], [], []
    for k, b in enumerate(item.boundaries):
        blocks = [(blk.tolist(), s0) for blk, s0 in item.at(k)]
        m = _lcp([blk for blk, _ in blocks])
        c = b if cached is None else min(b, cached, b - 1 if any(s0 == 0 for _, s0 in blocks) else b)
        base, head = len(parent), len(ids)  # the boundary's shared span: trace[c:b] re-fed, then the shared tokens
        parent.append(-1)
        shared = trace[c:b] + blocks[0][0][:m]
        ids += shared
        pos += range(c, b + m)
        prefix += [c] * len(shared)
        span += [base] * len(shared)
        for a, (blk, s0) in enumerate(blocks):
            sid, start = len(parent), len(ids)
            parent.append(base)
            ids += blk[m:]
            pos += range(b + m, b + len(blk))
            prefix += [c] * (len(blk) - m)
            span += [sid] * (len(blk) - m)

            def where(j: int) -> int:  # block index j -> query index (j = -1: the prefix's last token)
                if j < 0:
                    return head + (b - c) - 1 if b > c else -(b - 1) - 1
                return head + (b - c) + j if j < m else start + j - m

            for j in range(s0, len(blk)):
                tgt.append(where(j))
                prd.append(where(j - 1))
                own.append(k * item.width + a)
    long = dict(dtype=torch.long)
    return Query(
        torch.tensor(ids, **long),
        torch.tensor(pos, **long),
        torch.tensor(prefix, **long),
        torch.tensor(span, **long),
        torch.tensor(parent, **long),
        torch.tensor(tgt, **long),
        torch.tensor(prd, **long),
        torch.tensor(own, **long),
        len(item.boundaries) * item.width,
    )


def packed_layout(item, q: Query) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed sequence of one trace: ids [S], positions [S], allowed [S, S] bool, predictor index [M] into
    the sequence (S = L + Q: the trace, then its query)."""
    L, Q = len(item.trace_ids), len(q.ids)
    allowed = torch.zeros(L + Q, L + Q, dtype=torch.bool)
    allowed[:L, :L] = torch.ones(L, L, dtype=torch.bool).tril()
    allowed[L:, :L] = torch.arange(L)[None, :] < q.prefix[:, None]  # [Q, L]: the trace prefix
    allowed[L:, L:] = q.visible()
    predictors = torch.where(q.predictors >= 0, q.predictors + L, -q.predictors - 1)
    return torch.cat([item.trace_ids, q.ids]), torch.cat([torch.arange(L), q.pos]), allowed, predictors


def scores(token_logp: torch.Tensor, q: Query, width: int) -> torch.Tensor:
    """Per-token log-probs [M] summed per probe: [K+1, |A|]."""
    out = torch.zeros(q.n_probes, dtype=token_logp.dtype, device=token_logp.device)
    return out.index_add_(0, q.owner.to(token_logp.device), token_logp).view(-1, width)
