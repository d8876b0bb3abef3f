"""Attribution baselines (docs/method.md, "Baselines"): how much each segment mattered for the answer.

Both return, per trace, weights [K] over its segments that sum to 1; the redistributor spreads the
trace's GRPO advantage by them.
- `attention_weights`: attention the answer tokens pay to each segment (last layer, mean over heads),
  as in "Dense Reward for Free" (Chan et al., 2024).
- `gradient_weights`: |gradient x input| of log p(gold answer | trace up to b_K, forcing text), summed
  over each segment's tokens.
"""

from __future__ import annotations

import torch

from rredcot.stages.context import PolicyContext, probe_blocks, trace_ids
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
            queries = (
                slice(plen + bounds[-1], len(ids)) if plen + bounds[-1] < len(ids) else slice(len(ids) - 1, len(ids))
            )
            out.append(_segment_mass(att[queries].sum(0), plen, bounds))
    finally:
        model.set_attn_implementation(impl)
    return out


def gradient_weights(ro: Rollout, seg: Segmented, ctx: PolicyContext, chunk: int = 64) -> list[torch.Tensor]:
    """Batched: rows are independent, so the gradient of the summed log-probs gives each row's own."""
    model, tok = ctx.model, ctx.tokenizer
    rows = [i for i, b in enumerate(seg.boundaries) if len(b) >= 2]
    out = [torch.zeros(0) for _ in seg.boundaries]
    for lo in range(0, len(rows), chunk):
        part = rows[lo : lo + chunk]
        seqs, spans = [], []
        for i in part:
            ids, plen = trace_ids(ro, i)
            (block,), (shared,) = probe_blocks(tok, ctx.force_text or "", [ro.samples[i].gold + ctx.closing_text])
            head = plen + seg.boundaries[i][-1]
            seqs.append(torch.cat([ids[:head], block]))  # forcing text + answer tokenized as the model sees them
            spans.append((plen, head + shared, len(seqs[-1])))
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, x in enumerate(seqs):  # right padding: positions are plain 0..len-1
            ids[r, : len(x)], mask[r, : len(x)] = x, 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # [B, S, H]
        logp = torch.log_softmax(model(inputs_embeds=emb, attention_mask=mask).logits.float(), -1)  # [B, S, V]
        total = sum(logp[r, a - 1 : b - 1].gather(-1, ids[r, a:b, None]).sum() for r, (_, a, b) in enumerate(spans))
        (grad,) = torch.autograd.grad(total, emb)
        attr = (grad * emb).sum(-1).abs().detach().cpu()  # [B, S]
        for r, i in enumerate(part):
            out[i] = _segment_mass(attr[r], spans[r][0], seg.boundaries[i])
    return out
