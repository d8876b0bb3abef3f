"""Sharded models and the accelerator: FSDP2 / DeepSpeed ZeRO no-grad passes, engine settings and the
checkpoint state of a sharded model (what crosses ranks in general: rredcot/collectives.py).

Private names of torch and DeepSpeed used here were checked against torch 2.8-2.13 and DeepSpeed 0.16.4+
(see each function); issue 22 replaces them with public APIs.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from rredcot.collectives import active, env_world_size
from rredcot.errors import UserError
from rredcot.ui import note


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
    return accelerator


def will_shard(accelerator) -> bool:
    """Whether accelerate will split the weights over ranks (FSDP, or DeepSpeed ZeRO stage 3)."""
    ds = accelerator.state.deepspeed_plugin
    return str(accelerator.distributed_type).endswith("FSDP") or (ds is not None and ds.zero_stage == 3)


def fsdp2_modules(model) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # an old torch: no FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def _fsdp2_full(mods: list):
    """All-gather every FSDP2 unit once and keep it gathered: the forwards inside run no collectives."""
    saved = []
    for m in mods:
        state = m._get_fsdp_state()
        groups = list(state._fsdp_param_groups)
        saved.append((state, state._auto_reshard_after_forward, [(g, g.post_forward_mesh_info) for g in groups]))
        m.unshard()
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for g, info in groups:
                g.post_forward_mesh_info = info
        for m in mods:
            m.reshard()


def _deepspeed_zero3(model):
    """The DeepSpeed engine's parameter-offload object when the model runs under ZeRO stage 3, else None."""
    stage = getattr(model, "zero_optimization_stage", None)
    if not callable(stage) or stage() != 3 or getattr(model, "optimizer", None) is None:
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
            offload._register_deepspeed_module(offload.module)  # deepspeed >= 0.16.4


def full_weights(model):
    """Context for no-grad passes whose count differs between ranks (generation, probe chunks, evaluation).

    Under FSDP2 or ZeRO-3 every forward is a collective, so a rank that ran out of work would leave the
    others waiting forever; inside this context each rank holds the whole model and its forwards are
    local. Single process and DDP: nothing to do."""
    if not active():
        return nullcontext()
    mods = fsdp2_modules(model)
    if mods:
        return _fsdp2_full(mods)
    offload = _deepspeed_zero3(model)
    return _zero3_full(model, offload) if offload is not None else nullcontext()


def sharded(model) -> bool:
    """Whether the weights are split over ranks (FSDP2 or ZeRO-3): saving gathers them, every rank taking part."""
    return active() and (bool(fsdp2_modules(model)) or _deepspeed_zero3(model) is not None)


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


def full_state(accelerator, model, optimizer) -> tuple[dict | None, Any]:
    """(full weights or None, optimizer state) for a checkpoint; every rank calls it (gathers are collectives).

    Unsharded (one process, DDP): None (rank 0 saves its model) and the optimizer's own state. FSDP2: the full
    weights and the full optimizer state gathered to rank 0 (CPU), keyed by parameter name, so the file does
    not depend on the world size. ZeRO-3: the weights accelerate gathers; the optimizer state is not kept."""
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


def load_optimizer(model, optimizer, state: Any) -> None:
    """Restore what full_state saved (after accelerator.prepare: FSDP2 shards the full state over the ranks)."""

    if state is None:
        note(
            "the checkpoint holds no optimizer state (saved under DeepSpeed ZeRO-3): Adam's moments restart from zero."
        )
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
