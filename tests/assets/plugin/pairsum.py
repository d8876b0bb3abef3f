"""A user's own task and verifier, in their own module (docs/plugins.md's example, tested end to end).

rredcot train plugins=[pairsum.py] 'hydra.searchpath=[file://conf]' task=pairsum
"""

import random
import re

from rredcot.registry import register
from rredcot.stages.verify import Verifier
from rredcot.types import Sample

_BUCKETS = {"test": {0}, "dev": {1}, "train": set(range(2, 10))}  # disjoint splits by construction


@register("task", "pairsum")
def pairsum(cfg, split, tokenizer=None):
    """'37+45=?' -> 82, with a worked trace the warm start can learn from."""
    n = cfg.train_size if split == "train" else cfg.eval_size
    pairs = [(a, b) for a in range(100) for b in range(100) if (a * 100 + b) % 10 in _BUCKETS[split]]
    random.Random(f"{cfg.seed}-{split}").shuffle(pairs)
    return [
        Sample(prompt=f"{a}+{b}=?\n", gold=str(a + b), meta={"trace": f"<think>\n{a}+{b}={a + b}\n</think>\n{a + b}"})
        for a, b in pairs[:n]
    ]


@register("verify", "last_int")
class LastInt(Verifier):
    """The last integer after the end of thinking must equal the gold."""

    def extract(self, completion):
        found = re.findall(r"-?\d+", completion.rsplit("</think>", 1)[-1]) if "</think>" in completion else []
        return (found[-1], "last_int") if found else (None, "none")

    def judge(self, answer, sample):
        return float(answer is not None and int(answer) == int(sample.gold))
