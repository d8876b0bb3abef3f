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


DRAW_BLOCK = 1024  # tokens per block of draw's two-level inverse CDF
DRAW_SCRATCH = 1 << 20  # float64 elements of block-sum scratch (8 MiB, cache-sized): 6 rows of 151,936 at a time


def draw(probs: torch.Tensor, u: torch.Tensor, block: int = DRAW_BLOCK) -> torch.Tensor:
    """Inverse-CDF sampling: probs [N, V] (rows need not sum to 1), u [N] in [0, 1) -> token ids [N].

    Token i is drawn when cdf[i-1] <= u * total < cdf[i] (cdf in float64); a zero-probability token never is.
    Example: probs [.2, 0, .5, .3] (cdf .2 .2 .7 1.0): u=.1 -> 0, u=.2 -> 2 (not 1), u=.69 -> 2, u=.95 -> 3.

    Two levels, so that no [N, V] float64 copy or cumsum is built (one full cumsum peaked at 630 MiB of
    scratch at 256 x 151,936 and took 0.5-1.4 s on one CPU thread; this takes 8 MiB and ~15-20 ms): the
    float64 CDF over sums of `block` tokens picks the block, a float64 cumsum inside that block picks the
    token. The same choices as one full cumsum up to summation order (~1e-16); row i's token depends on
    row i alone (benchmarks/rollout.py measures it, tests/unit/test_sampling_draw.py checks it).
    """
    n, v = probs.shape
    u = u.to(probs.device, torch.float64)
    if v <= block:  # one block: the code before issue 23, bitwise (fl(u * total) < total for u < 1, so the
        # count stops at the last token with mass; the clamp only catches u = 1)
        cdf = probs.double().cumsum(-1)  # [N, V]
        return (cdf <= u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=v - 1)
    cum = block_sums(probs, block).cumsum(-1)  # [N, nb]: the float64 CDF at each block's end
    total = cum[:, -1:]  # [N, 1]
    target = u[:, None] * total  # [N, 1]
    # the first block whose CDF passes the target, and never past the last block with mass: a defence, as
    # fl(u * total) < total for any u < 1 and a float32 row's total (checked with numpy, IEEE nearest)
    b = torch.minimum((cum <= target).sum(-1), (cum < total).sum(-1))  # [N]
    before = torch.where(b > 0, cum.gather(-1, (b - 1).clamp(min=0)[:, None])[:, 0], 0.0)  # [N] CDF before block b
    idx = b[:, None] * block + torch.arange(block, device=probs.device)  # [N, block]; the last block may overrun V
    vals = probs.gather(-1, idx.clamp(max=v - 1)).double().masked_fill(idx >= v, 0.0)  # [N, block]
    # residual target - before >= 0 exactly (a rounded subtraction of a <= b is >= 0)
    return b * block + _first_past(vals, vals.cumsum(-1), target[:, 0] - before)


def _first_past(vals: torch.Tensor, cdf: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """vals, cdf [N, B] float64, r [N] -> [N]: the first index with cdf > r, i.e. cdf[i-1] <= r < cdf[i].

    Such an index has mass (cdf rises there). When none passes (r at or past the end through rounding),
    the last index with mass, never a zero-probability one; a row with no mass at all gives 0.
    """
    k = (cdf <= r[:, None]).sum(-1)  # [N]
    pos = torch.arange(vals.shape[-1], device=vals.device)
    last = torch.where(vals > 0, pos, 0).amax(-1)  # [N]
    return torch.minimum(k, last)


def block_sums(probs: torch.Tensor, block: int) -> torch.Tensor:
    """probs [N, V] -> [N, ceil(V / block)] float64 sums of consecutive `block` tokens (the last block partial).

    The float64 cast goes through a reused scratch of a fixed number of rows (no [N, V] float64 copy: torch
    2.13's sum(dtype=torch.float64) of a float32 tensor casts the whole input first, measured as slow as
    .double()), and
    every chunk is summed at that same shape: a reduction's order may depend on the shape it is given (CUDA
    picks its strategy by the number of outputs), so it must not depend on how many rows share the batch.
    The last chunk's spare rows hold stale or uninitialised values; each sum reads its own row, and theirs
    are dropped.
    """
    n, v = probs.shape
    nb = -(-v // block)
    rows = max(1, DRAW_SCRATCH // (nb * block))
    buf = probs.new_empty(rows, nb * block, dtype=torch.float64)  # not zeros: a fill of 8 MiB per call costs
    buf[:, v:] = 0.0  # as much as the sums; only the columns past V must be 0
    out = probs.new_empty(n, nb, dtype=torch.float64)
    for lo in range(0, n, rows):
        k = min(rows, n - lo)
        buf[:k, :v] = probs[lo : lo + k]  # the float32 -> float64 cast, into the scratch
        out[lo : lo + k] = buf.view(rows, nb, block).sum(-1)[:k]
    return out


def prefix_seeds(seed: int, step: int, prefixes: list[list[int]], n: int) -> list[int]:
    """Seeds for n continuations of each prefix, keyed by the prefix's tokens (not its position in a rank's
    batch): the same Monte Carlo values at any world size. Two identical prefixes get the same continuations
    (they estimate the same value)."""
    keys = [hashlib.blake2b(str(p).encode(), digest_size=8).hexdigest() for p in prefixes]
    return [row_seed(seed, "mc", step, k, j) for k in keys for j in range(n)]
