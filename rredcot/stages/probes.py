"""Answer-forcing probes scored by teacher forcing, all (K+1) x |A| of a trace in ONE forward pass.

The packed sequence of one trace is the trace followed by one block per probe (k, a):

    [ trace_ids (L) | force + answer_0 @ b_0 | force + answer_1 @ b_0 | ... | force + answer_last @ b_K ]

A 4-D attention mask lets the block of probe (k, a) see trace tokens [0, b_k) and itself causally, and
its position ids continue from b_k, so each block is scored exactly as if it followed trace_ids[:b_k]
alone. Several traces go in one batch, right-padded. `probe_logprobs_reference` scores every probe
with its own forward; the tests check that the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rredcot.logprobs import selective_log_softmax


@dataclass(frozen=True)
class ProbeItem:
    """One trace's probes: trace_ids [L], boundaries (prefix lengths into trace_ids, each >= 1 when
    force_ids is empty), force_ids [F], answers: list of 1-D id tensors (answer plus closing text)."""

    trace_ids: torch.Tensor
    boundaries: list[int]
    force_ids: torch.Tensor
    answers: list[torch.Tensor]

    @property
    def probe_tokens(self) -> int:
        return len(self.boundaries) * sum(len(self.force_ids) + len(a) for a in self.answers)


def _layout(item: ProbeItem):
    """ids [S], positions [S], allowed [S, S] bool, and per probe (k, a): (answer token indices, predictor indices)."""
    L, F = len(item.trace_ids), len(item.force_ids)
    ids, pos, blocks = [item.trace_ids], [torch.arange(L)], []
    start = L
    for b in item.boundaries:
        for a in item.answers:
            n = F + len(a)
            ids.append(torch.cat([item.force_ids, a]))
            pos.append(torch.arange(b, b + n))
            blocks.append((start, n, b))
            start += n
    S = start
    allowed = torch.zeros(S, S, dtype=torch.bool)
    allowed[:L, :L] = torch.ones(L, L, dtype=torch.bool).tril()
    targets, predictors = [], []
    for (s, n, b) in blocks:
        allowed[s : s + n, :b] = True  # the trace prefix
        allowed[s : s + n, s : s + n] = torch.ones(n, n, dtype=torch.bool).tril()  # itself, causally
        tgt = torch.arange(s + F, s + n)  # the answer tokens of this block
        prd = tgt - 1
        if F == 0:
            prd[0] = b - 1  # the first answer token is predicted by the last token of the prefix
        targets.append(tgt)
        predictors.append(prd)
    return torch.cat(ids), torch.cat(pos), allowed, targets, predictors


@torch.no_grad()
def probe_logprobs_batch(model, items: list[ProbeItem]) -> list[torch.Tensor]:
    """Score several traces' probes in one forward: returns per item a [K+1, |A|] tensor of summed
    answer-token log-probs."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    layouts = [_layout(it) for it in items]
    S = max(len(lay[0]) for lay in layouts)
    B = len(items)
    ids = torch.zeros(B, S, dtype=torch.long)
    pos = torch.zeros(B, S, dtype=torch.long)
    allowed = torch.zeros(B, 1, S, S, dtype=torch.bool)
    for i, (x, p, a, _, _) in enumerate(layouts):
        n = len(x)
        ids[i, :n], pos[i, :n], allowed[i, 0, :n, :n] = x, p, a
        allowed[i, 0, n:, 0] = True  # padding rows attend to something, so softmax stays finite
    mask = torch.zeros(B, 1, S, S, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    logits = model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device)).logits.float()
    out = []
    for i, (x, _, _, targets, predictors) in enumerate(layouts):
        scores = [selective_log_softmax(logits[i, prd], x[tgt].to(device)).sum() for tgt, prd in zip(targets, predictors)]
        out.append(torch.stack(scores).view(len(items[i].boundaries), len(items[i].answers)).cpu())
    return out


def probe_logprobs(model, trace_ids: torch.Tensor, boundaries: list[int], force_ids: torch.Tensor,
                   answers: list[torch.Tensor]) -> torch.Tensor:
    """[K+1, len(answers)]: summed log-prob of each answer's tokens given trace_ids[:b] + force_ids, for
    every boundary b, computed in one packed forward.

    Example: trace "a=3. a=?\\n<think>\\na=3\\n" with boundaries [9, 13], force "</think>\\n" and answers
    ["3</s>", "4</s>"] gives a 2 x 2 table; row 1 (after the line 'a=3') should favour "3".
    """
    return probe_logprobs_batch(model, [ProbeItem(trace_ids.cpu(), list(boundaries), force_ids.cpu(), [a.cpu() for a in answers])])[0]


@torch.no_grad()
def probe_logprobs_reference(model, trace_ids, boundaries, force_ids, answers) -> torch.Tensor:
    """The slow path: one forward per probe. Same output as probe_logprobs (for tests)."""
    device = next(model.parameters()).device
    out = torch.zeros(len(boundaries), len(answers))
    for k, b in enumerate(boundaries):
        for j, a in enumerate(answers):
            seq = torch.cat([trace_ids[:b], force_ids, a]).to(device)
            logits = model(input_ids=seq[None]).logits[0].float()
            start = b + len(force_ids)
            out[k, j] = selective_log_softmax(logits[start - 1 : len(seq) - 1], seq[start:]).sum().cpu()
    return out
