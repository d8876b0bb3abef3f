"""Sampling arithmetic: top-k / top-p filtering, inverse-CDF draws from keyed uniforms, and the seeds that key
them by what is sampled (seed, stream, step, global row; a Monte Carlo prefix's tokens), not by which process
samples it, so 1 and 8 processes draw the same completions. The backends that use them: stages/rollout.py.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus filtering: logits [N, V] -> [N, V] with dropped entries at -inf.

    Example: logits [2, 1, 0], top_k=2 -> [2, 1, -inf]; top_p=0.6 keeps the smallest set of most likely
    tokens whose mass reaches 0.6: p = [.665, .245, .090] -> [2, -inf, -inf].
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # mass before this token already enough
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pad_cat(ts: Sequence[torch.Tensor], value: float = 0) -> torch.Tensor:
    """[n_i, T_i] tensors -> [sum n_i, max T_i], each right-padded with `value` (chunks, or ranks' rows)."""
    width = max(t.shape[1] for t in ts)
    return torch.cat([F.pad(t, (0, width - t.shape[1]), value=value) for t in ts])


def row_seed(*key: object) -> int:
    """A 63-bit seed from a key such as (seed, "train", step, global row): sampling keyed by what is sampled,
    not by which process samples it, so 1 and 8 processes draw the same completions."""
    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_seeds(seed: int, stream: str, step: int, rows: Iterable[int]) -> list[int]:
    """row_seed(seed, stream, step, row) for each global row index in `rows`."""
    return [row_seed(seed, stream, step, r) for r in rows]


def keyed_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """[N, steps] uniforms in [0, 1), row i from its own generator seeded with seeds[i] (CPU, then moved)."""
    return (
        torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds])
        if seeds
        else torch.zeros(0, steps, dtype=torch.float64)
    )


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [N, V] (rows need not sum to 1), u [N] in [0, 1) -> token ids [N].

    Token i is drawn when cdf[i-1] <= u * total < cdf[i]; a zero-probability token never is.
    Example: probs [.2, 0, .5, .3] (cdf .2 .2 .7 1.0): u=.1 -> 0, u=.2 -> 2 (not 1), u=.69 -> 2, u=.95 -> 3.
    """
    cdf = probs.double().cumsum(-1)  # float64: the boundaries do not drift with the vocabulary size
    target = u.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    return (cdf <= target).sum(-1).clamp(max=probs.shape[-1] - 1)


def prefix_seeds(seed: int, step: int, prefixes: list[list[int]], n: int) -> list[int]:
    """Seeds for n continuations of each prefix, keyed by the prefix's tokens (not its position in a rank's
    batch): the same Monte Carlo values at any world size. Two identical prefixes get the same continuations
    (they estimate the same value)."""
    keys = [hashlib.blake2b(str(p).encode(), digest_size=8).hexdigest() for p in prefixes]
    return [row_seed(seed, "mc", step, k, j) for k in keys for j in range(n)]
