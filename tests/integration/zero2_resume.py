"""Run under torchrun (2 ranks, gloo, DeepSpeed's CPU accelerator) by test_distributed_zero.py: a DeepSpeed
ZeRO-2 checkpoint and resume through sharding.full_state / load_optimizer and runlog.save_checkpoint.

ZeRO-2 splits Adam's state over the ranks, so each rank must get its own partition back (issue 22: rank 0's
alone made DeepSpeed's load_state_dict fail with KeyError 0). The resumed engine then takes the same next
step as the one that never stopped, bit for bit. argv: [run directory].
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from rredcot import collectives, sharding
from rredcot.runlog import load_state, save_checkpoint
from rredcot.task.model import build_tiny, load_tokenizer

CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,  # as sharding.configure_engine sets it
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 2},
    "zero_allow_untested_optimizer": True,  # torch's AdamW, as rredcot builds it
}

dist.init_process_group("gloo")
rank, run = dist.get_rank(), Path(sys.argv[1])
tok = load_tokenizer("builtin")
arch = {"arch": "qwen2", "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "max_positions": 64}


def engine(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    eng, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=CONFIG)
    assert eng.zero_optimization_stage() == 2
    return eng, zero_opt


def step(eng, k: int) -> None:
    x = (torch.arange(12).view(2, 6) * (rank + k + 1)) % len(tok)  # each rank its own batch
    eng.backward(eng(input_ids=x, labels=x).loss)
    eng.step()


first, first_opt = engine(build_tiny(OmegaConf.create(arch), len(tok), seed=0))
step(first, 0)
step(first, 1)
staged = run / "checkpoints" / sharding.PARTITIONS
weights, state = sharding.full_state(None, first, first_opt, staged)
assert weights is None and state == {"zero_partitions": 2, "zero_stage": 2}, state
if rank == 0:
    save_checkpoint(run, 2, first.module, tok, {"step": 2, "optimizer": state}, keep=1, moved_in=staged)
collectives.barrier()
ckpt = run / "checkpoints" / "step_000002"
assert sorted(p.name for p in (ckpt / sharding.PARTITIONS).iterdir()) == [
    "rank_00000_of_00002.pt",
    "rank_00001_of_00002.pt",
]
assert not staged.exists()

resumed, resumed_opt = engine(AutoModelForCausalLM.from_pretrained(ckpt))
sharding.load_optimizer(resumed, resumed_opt, load_state(ckpt)["optimizer"], ckpt)
step(first, 2)
step(resumed, 2)
for (name, a), b in zip(first.module.named_parameters(), resumed.module.parameters()):
    assert torch.equal(a, b), f"{name} differs after the resumed step"
print(f"rank {rank}: zero2 resume ok", flush=True)
dist.destroy_process_group()
