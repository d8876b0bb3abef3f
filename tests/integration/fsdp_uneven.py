"""Run under torchrun (2 ranks, gloo) by test_distributed_fsdp.py: FSDP2 with uneven no-grad passes.

Every forward of a fully_shard-ed model all-gathers its weights, so ranks that run different numbers of
forwards (rank 0 samples 1 prompt in 1 chunk, rank 1 samples 5 in 5 chunks, with other token budgets)
wait on each other forever, unless the passes run inside sharding.full_weights. Then: a gradient step
through the sharded model, and the full checkpoint state (weights and optimizer, gathered to rank 0) that
a resume shards again. argv: [mode: "wrapped" | "naive"]. On one process (torchrun --nproc_per_node 1, as one
GPU under conf/accelerate/fsdp2.yaml) the same paths run: the weights are DTensors there too.

rredcot's code sees FSDP2 as torch 2.8-2.11 lay it out, and no private FSDP state at all: the state's
_fsdp_param_groups (2.13's name; 2.8-2.11 have _fsdp_param_group) and FSDPModule._get_fsdp_state raise
AttributeError when read from a rredcot module, as they would on a torch that lacks them (issue 22).
"""

from __future__ import annotations

import datetime
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
from torch.distributed.tensor import DTensor

from rredcot import collectives, sharding
from rredcot.stages.rollout import KVCacheBackend, sample_rollout
from rredcot.stages.sampling import row_seeds
from rredcot.task.model import build_tiny, load_tokenizer
from rredcot.types import Sample


class HiddenFromRredcot:
    """A private FSDP name that torch's own code reads as usual and rredcot's code cannot."""

    def __init__(self, name: str, method=None):
        self.name, self.method = name, method

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.split(".")[0] == "rredcot":
            raise AttributeError(f"{self.name}: not there on every supported torch (called from {caller})")
        if self.method is not None:
            return self.method.__get__(obj, owner)
        return obj.__dict__[self.name]

    def __set__(self, obj, value):
        obj.__dict__[self.name] = value


FSDPState._fsdp_param_groups = HiddenFromRredcot("_fsdp_param_groups")  # before fully_shard makes any state
FSDPModule._get_fsdp_state = HiddenFromRredcot("_get_fsdp_state", FSDPModule._get_fsdp_state)

mode = sys.argv[1]
# wrapped: rank 0 waits out rank 1's longer sampling at the next collective (slow on a loaded machine)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90 if mode == "wrapped" else 4))
rank = dist.get_rank()
tok = load_tokenizer("builtin")
model = build_tiny(
    OmegaConf.create(
        {"arch": "qwen2", "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "max_positions": 256}
    ),
    len(tok),
    seed=0,
)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
assert sharding.sharded(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

samples = [Sample(f"a={i}, b=a+1. b=?\n", str(i + 1)) for i in range(1 + 4 * rank)]
with sharding.full_weights(model) if mode == "wrapped" else nullcontext():
    assert mode != "wrapped" or not any(isinstance(p, DTensor) for p in model.parameters()), "not gathered"
    ro = sample_rollout(
        KVCacheBackend(model, tok, chunk_size=2),
        tok,
        samples,
        group_size=2,
        max_new_tokens=6 + 10 * rank,
        seeds=row_seeds(0, "test", 1, range(2 * len(samples))),
    )
print(f"rank {rank}: sampled {tuple(ro.completion_ids.shape)} uneven ok", flush=True)
with torch.no_grad():  # after the context every unit reshards after its forward again (memory for training)
    model(input_ids=torch.arange(2, 8).view(1, 6))
assert all(isinstance(p, DTensor) for p in model.parameters()), "left gathered"

x = torch.arange(2, 14).view(2, 6)  # the same micro-batch on both ranks: equal forward/backward counts
model(input_ids=x, labels=x).loss.backward()
optimizer.step()
weights, optim_state = sharding.full_state(None, model, optimizer)
if rank == 0:
    assert set(weights) >= {"model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"}, sorted(weights)[:4]
    assert all(not isinstance(v, DTensor) for v in weights.values())
state = collectives.broadcast(optim_state)  # a resume reads the file on every rank
sharding.load_optimizer(model, optimizer, state)
again = sharding.full_state(None, model, optimizer)[1]
if rank == 0:
    a, b = state["by_name"]["state"], again["by_name"]["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
print(f"rank {rank}: step and checkpoint state ok", flush=True)
dist.destroy_process_group()
