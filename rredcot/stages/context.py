"""What the value and attribution estimators see besides the batch (PolicyContext), and the helpers they share
to read a trace (its token ids, its group's answers, the forcing text's probe blocks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from rredcot.types import Rollout


@dataclass
class PolicyContext:
    """What value estimators may use besides the batch: the current policy and the task's texts."""

    model: Any
    tokenizer: Any
    verifier: Any  # the task's Verifier: extract(completion), judge(answer, sample), (completion, sample) -> Score
    force_text: str | None  # appended at a boundary to ask for the answer (task.forcing_text)
    closing_text: str  # follows the answer (task.closing_text)
    generate: Callable | None = None  # (prefix id lists, n, budgets) -> texts, for Monte Carlo (keyed by the RL step)
    temperature: float = 1.0  # the sampling temperature: probes score the policy that samples (as the update does)
    max_new_tokens: int = 0  # the rollout's completion budget (Monte Carlo continuations share it)


def _encode(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def probe_blocks(tok, force_text: str, texts: list[str]) -> tuple[list[torch.Tensor], list[int]]:
    """Per text (an answer plus the closing text): the forcing text and it tokenized together, as the model
    would see them, and how many leading tokens it shares with the forcing text alone (not scored).

    Example (byte-level BPE): force "\\boxed{", text "\\frac12}" may give [\\, boxed, {\\, frac, 12, }]
    where the forcing text alone is [\\, boxed, {]: 2 shared tokens, and `{\\` is scored with the answer."""
    force = _encode(tok, force_text).tolist()
    blocks, starts = [], []
    for text in texts:
        joint = _encode(tok, force_text + text)
        k = 0
        while k < min(len(force), len(joint) - 1) and joint[k] == force[k]:
            k += 1
        blocks.append(joint)
        starts.append(k)
    return blocks, starts


def trace_ids(ro: Rollout, row: int) -> tuple[torch.Tensor, int]:
    """(prompt without padding + completion without padding [L], prompt length)."""
    prompt = ro.prompt_ids[row][ro.prompt_mask[row].bool()]
    n = int(ro.completion_mask[row].sum())
    return torch.cat([prompt, ro.completion_ids[row, :n]]).cpu(), len(prompt)


def group_answers(ro: Rollout, ctx: PolicyContext, g0: int, group_size: int, include_reference: bool) -> list[str]:
    """Distinct final answers of one group (in order of appearance), plus the gold if asked."""
    seen: list[str] = []
    for text in ro.texts[g0 : g0 + group_size]:
        a = ctx.verifier.extract(text)[0]
        if a is not None and a.strip() and a.strip() not in seen:
            seen.append(a.strip())
    gold = ro.samples[g0].gold.strip()
    if include_reference and gold and gold not in seen:
        seen.append(gold)
    return seen
