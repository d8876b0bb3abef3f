"""rredcot/sharding.py in one process: the FSDP version a launch must have, and the DeepSpeed ZeRO-1/2 optimizer
partitions a checkpoint holds, through a fake engine of DeepSpeed's real interface (two ranks played in turn).
The real engines: tests/integration/test_distributed_zero.py (ZeRO-2, CPU) and test_gpu_distributed.py (CUDA)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rredcot import collectives, sharding
from rredcot.errors import UserError

# ---- the FSDP version (issue 22: accelerate 1.0-1.5 gives FSDP1 whatever the config says) -------------------


def _fsdp_accelerator(plugin):
    from accelerate.utils import DistributedType

    return SimpleNamespace(
        distributed_type=DistributedType.FSDP, num_processes=1, state=SimpleNamespace(fsdp_plugin=plugin)
    )


def test_a_launch_that_got_fsdp1_is_refused_with_the_fix(monkeypatch):
    import accelerate
    from accelerate.utils import FullyShardedDataParallelPlugin

    fake = _fsdp_accelerator(FullyShardedDataParallelPlugin(fsdp_version=1))
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kw: fake)  # make_accelerator's own Accelerator
    with pytest.raises(UserError) as e:
        sharding.make_accelerator("cpu")
    said = str(e.value)
    assert "FSDP version 1" in said and "accelerate >= 1.6" in said and "fsdp_version: 2" in said
    assert e.value.exit_code == 2


def test_an_accelerate_without_fsdp_version_is_refused_naming_what_was_asked(monkeypatch):
    monkeypatch.setenv("FSDP_VERSION", "2")  # accelerate launch's export of the config's fsdp_version
    with pytest.raises(UserError) as e:
        sharding.check_fsdp(_fsdp_accelerator(SimpleNamespace()))  # accelerate 1.5's plugin: no such field
    assert "FSDP version 1 although the launch asked for FSDP_VERSION=2" in str(e.value)


def test_fsdp2_must_reshard_after_forward_and_then_passes():
    from accelerate.utils import FullyShardedDataParallelPlugin

    with pytest.raises(UserError, match="fsdp_reshard_after_forward: true"):
        sharding.check_fsdp(
            _fsdp_accelerator(FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=False))
        )
    sharding.check_fsdp(_fsdp_accelerator(FullyShardedDataParallelPlugin(fsdp_version=2)))


# ---- ZeRO-1/2 optimizer partitions --------------------------------------------------------------------------


class FakeZeroOptimizer:
    """DeepSpeedZeroOptimizer's checkpoint interface (runtime/zero/stage_1_and_2.py, deepspeed 0.16.4-0.19.6):
    state_dict() is this rank's partition; load_state_dict takes one per data-parallel rank and reads its own
    (`current_rank_sd = state_dict_list[dp_rank]`), so a single dict fails there with KeyError 0."""

    def __init__(self, rank: int):
        self.rank, self.loaded = rank, None
        self.partition = {
            "base_optimizer_state": {"exp_avg": torch.full((3,), float(rank + 1))},
            "partition_count": [2],
        }

    def state_dict(self):
        return self.partition

    def load_state_dict(
        self,
        state_dict_list,
        load_optimizer_states=True,
        load_from_fp32_weights=False,
        checkpoint_folder=None,
        load_serial=None,
        param_shapes=None,
    ):
        self.loaded = (state_dict_list[self.rank], load_from_fp32_weights)


class FakeEngine:
    """DeepSpeedEngine's methods that sharding reads (runtime/engine.py, the same in 0.16.4 and 0.19.6)."""

    def __init__(self, rank: int, stage: int = 2):
        self.optimizer, self.stage = FakeZeroOptimizer(rank), stage

    def zero_optimization_stage(self):
        return self.stage

    def zero_elastic_checkpoint(self):
        return False

    def zero_load_from_fp32_weights(self):
        return True


@pytest.fixture
def ranks(monkeypatch):
    """Play rank r of `world` in this process: sharding asks collectives who it is (barriers: one process)."""
    monkeypatch.setattr(sharding, "_deepspeed_state_classes", lambda: [], raising=False)  # the fake saves tensors only
    monkeypatch.setattr(collectives, "barrier", lambda: None)

    def play(r: int, world: int = 2):
        monkeypatch.setattr(collectives, "rank", lambda: r)
        monkeypatch.setattr(collectives, "size", lambda: world)

    return play


def _save_two_ranks(ranks, ckpt):
    """Both ranks' save (rank 0 first: it clears the folder), then the folder moved into the checkpoint."""
    staged = ckpt.parent / sharding.PARTITIONS
    for r in (0, 1):
        ranks(r)
        engine = FakeEngine(r)
        weights, state = sharding.full_state(None, engine, engine.optimizer, staged)
        assert weights is None and state == {"zero_partitions": 2, "zero_stage": 2}
    ckpt.mkdir()
    staged.rename(ckpt / sharding.PARTITIONS)
    return state


def test_a_zero2_resume_gives_each_rank_its_own_partition(ranks, tmp_path):
    ckpt = tmp_path / "step_000002"
    state = _save_two_ranks(ranks, ckpt)
    for r in (0, 1):
        ranks(r)
        engine = FakeEngine(r)
        sharding.load_optimizer(engine, engine.optimizer, state, ckpt)
        own, fp32 = engine.optimizer.loaded
        assert torch.equal(own["base_optimizer_state"]["exp_avg"], torch.full((3,), float(r + 1))) and fp32


def test_a_zero2_resume_on_another_world_size_is_refused(ranks, tmp_path):
    ckpt = tmp_path / "step_000002"
    state = _save_two_ranks(ranks, ckpt)
    ranks(0, world=4)
    with pytest.raises(UserError, match=r"partitions for 2 process\(es\), and 4 were launched.*--num_processes 2"):
        sharding.load_optimizer(FakeEngine(0), None, state, ckpt)


def test_optimizer_state_does_not_move_between_zero12_and_other_launches(ranks, tmp_path):
    ckpt = tmp_path / "step_000002"
    state = _save_two_ranks(ranks, ckpt)
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]).state_dict()  # one process or DDP
    with pytest.raises(UserError, match="saved without DeepSpeed ZeRO-1/2, and this launch runs under ZeRO-2"):
        sharding.load_optimizer(FakeEngine(0), None, plain, ckpt)
    with pytest.raises(UserError, match="saved under DeepSpeed ZeRO-2, and this launch runs without DeepSpeed"):
        sharding.load_optimizer(torch.nn.Linear(2, 2), None, state, ckpt)


def test_a_missing_partition_is_named(ranks, tmp_path):
    ckpt = tmp_path / "step_000002"
    state = _save_two_ranks(ranks, ckpt)
    (ckpt / sharding.PARTITIONS / "rank_00001_of_00002.pt").unlink()
    ranks(1)
    with pytest.raises(UserError, match="rank_00001_of_00002.pt' is missing"):
        sharding.load_optimizer(FakeEngine(1), None, state, ckpt)
