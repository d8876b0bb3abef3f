"""Sharded models and the accelerator: FSDP2 / DeepSpeed ZeRO no-grad passes, engine settings and the
checkpoint state of a sharded model (what crosses ranks in general: rredcot/collectives.py).

Public APIs only, so the same code runs on every torch a user may have: FSDPModule.unshard / reshard /
set_reshard_after_forward and torch.distributed.checkpoint.state_dict (read in torch 2.8, 2.9, 2.10, 2.11,
2.13 and main, which store their FSDP2 state under private names that changed in 2.13), accelerate's plugin
fields (1.6-1.16) and DeepSpeed's engine methods and ZeRO optimizer state_dict interface (0.16.4-0.19.6;
the one private hook of ZeRO-3 is named in _zero3_full).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from rredcot import collectives
from rredcot.collectives import env_world_size
from rredcot.errors import UserError
from rredcot.ui import note

PARTITIONS = "zero_optimizer"  # a checkpoint's folder of DeepSpeed ZeRO-1/2 optimizer partitions, one file a rank


def make_accelerator(device: str):
    """The Accelerator for device=auto|cpu|cuda, refusing a launch it would not really distribute.

    Without a GPU, accelerate distributes only when told cpu=True: otherwise every rank of a torchrun
    launch trains alone, unsynchronised, as if it were the only one (measured: 2 ranks, distributed_type NO)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
    launched = env_world_size()
    if launched > 1 and (accelerator.num_processes != launched or accelerator.distributed_type == DistributedType.NO):
        raise UserError(
            f"The launcher started {launched} processes, but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}): the ranks would train separately. Launch with torchrun "
            "--nproc_per_node N or accelerate launch --num_processes N, and check `accelerate env`."
        )
    check_fsdp(accelerator)
    return accelerator


def check_fsdp(accelerator) -> None:
    """FSDP as rredcot runs it: version 2 (fully_shard), every unit resharding after forward.

    accelerate 1.0-1.5 has no fsdp_version (it always gives FSDP1, whatever the config says), and 1.6+ gives
    FSDP1 unless fsdp_version: 2 reaches it (FSDP_VERSION, from the config file): under FSDP1 fsdp2_modules
    finds nothing, full_weights does nothing and ranks with uneven generation wait on each other forever."""
    if not str(accelerator.distributed_type).endswith("FSDP"):
        return
    import os

    import accelerate

    plugin = accelerator.state.fsdp_plugin
    version = getattr(plugin, "fsdp_version", 1)
    if version != 2:
        asked = os.environ.get("FSDP_VERSION")
        raise UserError(
            f"accelerate {accelerate.__version__} set up FSDP version {version}"
            + (f" although the launch asked for FSDP_VERSION={asked}" if asked and asked != str(version) else "")
            + ", and rredcot runs FSDP2 only (under FSDP1 uneven per-rank generation hangs). Use accelerate "
            ">= 1.6 (pip install -U 'accelerate>=1.6') with fsdp_version: 2 under fsdp_config in the accelerate "
            "config (conf/accelerate/fsdp2.yaml has it)."
        )
    if getattr(plugin, "reshard_after_forward", True) is not True:
        raise UserError(
            f"The accelerate config sets fsdp_reshard_after_forward: {plugin.reshard_after_forward}; rredcot's "
            "full-weight passes (generation, probes, evaluation) leave every FSDP2 unit resharding after forward "
            "(torch has no public way to read the setting back). Set fsdp_reshard_after_forward: true "
            "(conf/accelerate/fsdp2.yaml has it)."
        )


def will_shard(accelerator) -> bool:
    """Whether accelerate will split the weights over ranks (FSDP, or DeepSpeed ZeRO stage 3)."""
    ds = accelerator.state.deepspeed_plugin
    return str(accelerator.distributed_type).endswith("FSDP") or (ds is not None and ds.zero_stage == 3)


def fsdp2_modules(model) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule  # public since torch 2.6
    except ImportError:  # an old torch: no FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def _fsdp2_full(mods: list):
    """All-gather every FSDP2 unit once and keep it gathered: the forwards inside run no collectives.

    Public FSDPModule methods only (the same signatures in torch 2.8-2.13 and main; the private state behind
    them moved from _fsdp_param_group to _fsdp_param_groups in 2.13). torch has no public getter for a unit's
    reshard_after_forward, so on exit every unit reshards after forward, as fsdp_reshard_after_forward: true
    asks (check_fsdp refuses false). accelerate >= 1.14 keeps the root and the final norm / lm_head gathered
    from forward to backward instead: after the first pass here they are all-gathered once more per backward.
    Not nested: an inner exit would reshard the units under the outer context."""
    for m in mods:
        m.unshard()  # a collective: every rank unshards the same units in the same (module) order
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()  # local: frees the gathered weights, the shards stay


def _deepspeed_stage(model) -> int:
    """The DeepSpeed ZeRO stage the model's engine runs (engine.zero_optimization_stage()); 0 without one."""
    stage = getattr(model, "zero_optimization_stage", None)
    if not callable(stage) or getattr(model, "optimizer", None) is None:
        return 0
    return int(stage())


def _deepspeed_zero3(model):
    """The DeepSpeed engine's parameter-offload object when the model runs under ZeRO stage 3, else None."""
    if _deepspeed_stage(model) != 3:
        return None
    return getattr(model.optimizer, "parameter_offload", model.optimizer)


@contextmanager
def _zero3_full(model, offload):
    """DeepSpeed ZeRO-3: gather the parameters once and lift the per-module fetch hooks (TRL does the same
    for generation), so the forwards inside run no collectives. Needs memory for the full model."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(model.parameters()):
        for module in offload.module.modules():
            for p in module.parameters(recurse=False):
                p.ds_active_sub_modules.clear()
        for hook in [*offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)  # private; deepspeed >= 0.16.4


def full_weights(model):
    """Context for no-grad passes whose count differs between ranks (generation, probe chunks, evaluation).

    Under FSDP2 or ZeRO-3 every forward is a collective, so a rank that ran out of work would leave the
    others waiting forever; inside this context each rank holds the whole model and its forwards are
    local. On one process too (one GPU under an FSDP2 or ZeRO-3 config), so that launch runs the same
    code. Not sharded (DDP, ZeRO-1/2): nothing to do."""
    mods = fsdp2_modules(model)
    if mods:
        return _fsdp2_full(mods)
    offload = _deepspeed_zero3(model)
    return _zero3_full(model, offload) if offload is not None else nullcontext()


def sharded(model) -> bool:
    """Whether the weights are split (FSDP2 or ZeRO-3, at any world size): saving gathers them, every rank
    taking part (one process included: its parameters are DTensors or ZeRO-3 stubs, not plain tensors)."""
    return bool(fsdp2_modules(model)) or _deepspeed_zero3(model) is not None


def configure_engine(accelerator, update_cfg) -> None:
    """DeepSpeed (through accelerate) before prepare: it needs the per-GPU micro-batch (no dataloader passes
    through prepare), it clips gradients itself (its gradient_clipping stands for update.max_grad_norm) and
    it must not accumulate on its own (rredcot does: gradient_accumulation_steps 1)."""

    ds = accelerator.state.deepspeed_plugin
    if ds is None:
        return
    conf = ds.deepspeed_config
    conf["train_micro_batch_size_per_gpu"] = int(update_cfg.micro_batch_size)
    if conf.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise UserError(
            f"The DeepSpeed config sets gradient_accumulation_steps={conf['gradient_accumulation_steps']}; "
            "rredcot accumulates micro-batches itself (update.micro_batch_size, update.steps_per_generation). "
            "Set it to 1 in the accelerate config (conf/accelerate/zero2.yaml and zero3.yaml do)."
        )
    clip = conf.get("gradient_clipping", "auto")
    if clip == "auto":
        conf["gradient_clipping"] = float(update_cfg.max_grad_norm)
    elif float(clip) != float(update_cfg.max_grad_norm):
        note(
            f"DeepSpeed clips gradients at its gradient_clipping={clip}, not update.max_grad_norm="
            f"{update_cfg.max_grad_norm}: set them equal in the accelerate config to clip where the config says."
        )


def full_state(accelerator, model, optimizer, partitions: Path | None = None) -> tuple[dict | None, Any]:
    """(full weights or None, optimizer state) for a checkpoint; every rank calls it (gathers are collectives).

    Unsharded (one process, DDP): None (rank 0 saves its model) and the optimizer's own state. FSDP2: the full
    weights and the full optimizer state gathered to rank 0 (CPU), keyed by parameter name, so the file does
    not depend on the world size. ZeRO-1/2: each rank writes its optimizer partition into the folder
    `partitions` (the caller moves it into the checkpoint) and the state is a note of how many there are.
    ZeRO-3: the weights accelerate gathers; the optimizer state is not kept."""
    if _deepspeed_stage(model) in (1, 2):
        if partitions is None:
            raise ValueError("ZeRO-1/2 optimizer state is saved per rank: pass the folder `partitions`")
        return None, save_partitions(model, partitions)
    if not sharded(model):
        return None, optimizer.state_dict()
    if fsdp2_modules(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
        return get_model_state_dict(model, options=opts), {
            "by_name": get_optimizer_state_dict(model, inner, options=opts)
        }
    return accelerator.get_state_dict(model), None


def load_optimizer(model, optimizer, state: Any, ckpt: Path | None = None) -> None:
    """Restore what full_state saved (after accelerator.prepare: FSDP2 shards the full state over the ranks;
    ZeRO-1/2 ranks read their own partition from the checkpoint folder `ckpt`)."""

    if state is None:
        note(
            "the checkpoint holds no optimizer state (saved under DeepSpeed ZeRO-3): Adam's moments restart from zero."
        )
        return
    if (isinstance(state, dict) and "zero_partitions" in state) or _deepspeed_stage(model) in (1, 2):
        load_partitions(model, state, ckpt)
        return
    by_name = isinstance(state, dict) and set(state) == {"by_name"}
    if by_name or fsdp2_modules(model):
        if not by_name:
            raise UserError(
                "This checkpoint's optimizer state was saved without FSDP2 and cannot be sharded. Resume it "
                "with the launch it was made with (one process or DDP), or start a new run under FSDP2."
            )
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            model,
            getattr(optimizer, "optimizer", optimizer),
            state["by_name"],
            options=StateDictOptions(full_state_dict=True),
        )
        return
    optimizer.load_state_dict(state)


# ---- DeepSpeed ZeRO-1/2: the optimizer state is partitioned over the ranks, the weights are not ----------------


def _partition_file(folder: Path, rank: int, world: int) -> Path:
    return folder / f"rank_{rank:05d}_of_{world:05d}.pt"


def save_partitions(model, folder: Path) -> dict:
    """Each rank saves its own partition (engine.optimizer.state_dict(), what DeepSpeed's save_checkpoint
    writes as zero_pp_rank_R_mp_rank_00_optim_states.pt), so no rank holds another's. Not save_checkpoint
    itself: it also writes a second copy of the weights, which its load_checkpoint then reloads."""
    rank, world = collectives.rank(), collectives.size()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)  # what an interrupted save left
        folder.mkdir(parents=True)
    collectives.barrier()
    torch.save(model.optimizer.state_dict(), _partition_file(folder, rank, world))
    collectives.barrier()  # every file is complete before rank 0 moves the folder into the checkpoint
    return {"zero_partitions": world, "zero_stage": _deepspeed_stage(model)}


def load_partitions(model, state: Any, ckpt: Path | None) -> None:
    """ZeRO-1/2 resume: DeepSpeed's optimizer.load_state_dict takes one state per data-parallel rank and reads
    its own (`state_dict_list[dp_rank]`: a single dict there is the KeyError 0 of issue 22); its engine fills
    the other places with None unless the config asks for an elastic checkpoint. The partitions fit only the
    world size they were cut for: DeepSpeed's own load_checkpoint refuses another one too."""
    stage, partitioned = _deepspeed_stage(model), isinstance(state, dict) and "zero_partitions" in state
    if stage not in (1, 2) or not partitioned:
        made = f"under DeepSpeed ZeRO-{state['zero_stage']}" if partitioned else "without DeepSpeed ZeRO-1/2"
        now = f"under ZeRO-{stage}" if stage else "without DeepSpeed"
        raise UserError(
            f"This checkpoint's optimizer state was saved {made}, and this launch runs {now}: the state cannot "
            "move between the two. Resume with the launch (accelerate config) it was made with, or start a new run."
        )
    world, saved = collectives.size(), int(state["zero_partitions"])
    if saved != world:
        raise UserError(
            f"This checkpoint's optimizer state is DeepSpeed ZeRO-{state['zero_stage']} partitions for {saved} "
            f"process(es), and {world} were launched: DeepSpeed cannot cut them again. Resume on {saved} "
            f"(accelerate launch --num_processes {saved}, or torchrun --nproc_per_node {saved})."
        )
    ranks = range(world) if model.zero_elastic_checkpoint() else [collectives.rank()]
    states: list = [None] * world
    for r in ranks:
        states[r] = _read_partition(_partition_file(Path(ckpt) / PARTITIONS, r, world))
    model.optimizer.load_state_dict(
        state_dict_list=states,
        load_optimizer_states=True,
        load_from_fp32_weights=model.zero_load_from_fp32_weights(),  # as the engine's load_checkpoint does
    )


def _deepspeed_state_classes() -> list:
    """The DeepSpeed classes a ZeRO-1/2 state_dict holds besides tensors (deepspeed 0.16.4-0.19.6): plain data
    objects that the weights-only unpickler may rebuild without running code from the file."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _read_partition(path: Path) -> dict:
    import pickle

    if not path.exists():
        raise UserError(f"{str(path)!r} is missing: the checkpoint is incomplete. Resume from an earlier one.")
    torch.serialization.add_safe_globals(_deepspeed_state_classes())  # torch >= 2.4
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{str(path)!r} holds an object rredcot does not unpickle (it would run code from the file): "
            f"{str(e).strip().splitlines()[0][:200]}. If this DeepSpeed version saves a new kind of object, "
            "report it; meanwhile resume with the DeepSpeed version that saved the checkpoint."
        ) from None
