"""Attribution baselines (METHOD.md section 6): how much each segment mattered for the answer.

Both return, per trace, weights [K] over its segments that sum to 1; the redistributor spreads the
trace's GRPO advantage by them.
- `attention_weights`: attention the answer tokens pay to each segment (last layer, mean over heads),
  as in "Dense Reward for Free" (Chan et al., 2024).
- `gradient_weights`: |gradient x input| of log p(gold answer | trace up to b_K, forcing text), summed
  over each segment's tokens.
"""
from __future__ import annotations

import torch

from rredcot.stages.values import PolicyContext, _encode, trace_ids
from rredcot.types import Rollout, Segmented


def _segment_mass(per_token: torch.Tensor, plen: int, bounds: list[int]) -> torch.Tensor:
    """per_token [L] -> [K] sums over segments (completion offsets shifted by the prompt), normalised."""
    mass = torch.stack([per_token[plen + a : plen + b].sum() for a, b in zip(bounds, bounds[1:])])
    total = mass.sum()
    return mass / total if total > 0 else torch.full_like(mass, 1.0 / len(mass))


@torch.no_grad()
def attention_weights(ro: Rollout, seg: Segmented, ctx: PolicyContext) -> list[torch.Tensor]:
    model = ctx.model
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")  # only eager attention returns the weights
    out = []
    try:
        for row, bounds in enumerate(seg.boundaries):
            if len(bounds) < 2:
                out.append(torch.zeros(0))
                continue
            ids, plen = trace_ids(ro, row)
            att = model(input_ids=ids[None].to(model.device), output_attentions=True).attentions[-1][0]  # [H, L, L]
            att = att.float().mean(0).cpu()  # [L, L]
            queries = slice(plen + bounds[-1], len(ids)) if plen + bounds[-1] < len(ids) else slice(len(ids) - 1, len(ids))
            out.append(_segment_mass(att[queries].sum(0), plen, bounds))
    finally:
        model.set_attn_implementation(impl)
    return out


def gradient_weights(ro: Rollout, seg: Segmented, ctx: PolicyContext) -> list[torch.Tensor]:
    model, tok = ctx.model, ctx.tokenizer
    force = _encode(tok, ctx.force_text or "")
    emb_layer = model.get_input_embeddings()
    out = []
    for row, bounds in enumerate(seg.boundaries):
        if len(bounds) < 2:
            out.append(torch.zeros(0))
            continue
        ids, plen = trace_ids(ro, row)
        answer = _encode(tok, ro.samples[row].gold + ctx.closing_text)
        seq = torch.cat([ids[: plen + bounds[-1]], force, answer]).to(model.device)
        emb = emb_layer(seq[None]).detach().requires_grad_(True)  # [1, S, H]
        logits = model(inputs_embeds=emb).logits[0].float()
        start = len(seq) - len(answer)
        logp = torch.log_softmax(logits[start - 1 : -1], -1).gather(-1, seq[start:, None]).sum()
        (grad,) = torch.autograd.grad(logp, emb)
        out.append(_segment_mass((grad * emb).sum(-1)[0].abs().detach().cpu(), plen, bounds))
    return out
