"""Data parallel: N processes (torchrun or accelerate launch), each owning whole prompt groups.

Segmenting, the probe pass and redistribution stay on the rank that sampled the group; only scalars and
the per-step records for logging cross ranks. Every collective here is called by all ranks, in the
same order, unconditionally (a collective one rank skips is a hang). With one process every function
is the plain single-process computation, so the same code path runs on a laptop and on a cluster.

Rank r of W owns the contiguous block of prompt slots [r * P / W, (r + 1) * P / W) of each step's P
prompts, so global row i (prompt slot i // G, completion i % G) is on the same rank at any W that
divides P, and sampling keyed by (seed, step, global row) gives the same completions at any W.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Any, Sequence

import torch
import torch.distributed as dist


def env_world_size() -> int:
    """The world size a launcher set (torchrun, accelerate launch, srun + torchrun), before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(device: str):
    """The Accelerator for device=auto|cpu|cuda, refusing a launch it would not really distribute.

    Without a GPU, accelerate distributes only when told cpu=True: otherwise every rank of a torchrun
    launch trains alone, unsynchronised, as if it were the only one (measured: 2 ranks, distributed_type NO)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from rredcot.errors import UserError

    accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
    launched = env_world_size()
    if launched > 1 and (accelerator.num_processes != launched or accelerator.distributed_type == DistributedType.NO):
        raise UserError(f"The launcher started {launched} processes, but accelerate set up {accelerator.num_processes} "
                        f"({accelerator.distributed_type}): the ranks would train separately. Launch with torchrun "
                        "--nproc_per_node N or accelerate launch --num_processes N, and check `accelerate env`.")
    return accelerator


def will_shard(accelerator) -> bool:
    """Whether accelerate will split the weights over ranks (FSDP, or DeepSpeed ZeRO stage 3)."""
    ds = accelerator.state.deepspeed_plugin
    return str(accelerator.distributed_type).endswith("FSDP") or (ds is not None and ds.zero_stage == 3)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shard(items: Sequence, strict: bool = True) -> tuple[int, list]:
    """(offset, this rank's contiguous block of `items`). strict: the length must divide by the world size
    (training batches: checked at config time); otherwise the first ranks take one more (evaluation)."""
    n, w, r = len(items), size(), rank()
    if strict and n % w:
        raise ValueError(f"{n} items cannot be split evenly over {w} ranks")
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, list(items[lo : lo + base + (1 if r < extra else 0)])


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable; tensors should be on the CPU)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * size()
    dist.all_gather_object(out, obj)
    return out


def total(x: float) -> float:
    """The sum of a number over ranks (exact for counts: the dapo token denominator)."""
    if not active():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (a stop signal that reached one rank stops all)."""
    return total(1.0 if flag else 0.0) > 0


def pooled(x: torch.Tensor) -> torch.Tensor:
    """The 1-D tensor of every rank's values concatenated in rank order (batch statistics: scale=batch)."""
    if not active():
        return x
    return torch.cat([p.to(x.device) for p in gather(x.detach().cpu())])


def reduce_scalars(means: dict[str, float], maxes: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(per-key mean of `means`, per-key max of `maxes`) over ranks, in one gather; a key some rank lacks is
    reduced over the ranks that have it."""
    parts = gather((means, maxes))

    def reduce(i: int, how) -> dict[str, float]:
        keys = sorted({k for p in parts for k in p[i]})
        return {k: how([float(p[i][k]) for p in parts if k in p[i]]) for k in keys}

    return reduce(0, lambda v: sum(v) / len(v)), reduce(1, max)


@contextmanager
def main_first():
    """Rank 0 runs the block first (builds the warm-start cache, prepares data); the others wait, then run it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (the run directory's name, chosen once)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- no-grad passes under sharded weights -------------------------------------------------------------


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
    from rredcot.errors import UserError
    from rredcot.ui import note

    ds = accelerator.state.deepspeed_plugin
    if ds is None:
        return
    conf = ds.deepspeed_config
    conf["train_micro_batch_size_per_gpu"] = int(update_cfg.micro_batch_size)
    if conf.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise UserError(f"The DeepSpeed config sets gradient_accumulation_steps={conf['gradient_accumulation_steps']}; "
                        "rredcot accumulates micro-batches itself (update.micro_batch_size, update.steps_per_generation). "
                        "Set it to 1 in the accelerate config (conf/accelerate/zero2.yaml and zero3.yaml do).")
    clip = conf.get("gradient_clipping", "auto")
    if clip == "auto":
        conf["gradient_clipping"] = float(update_cfg.max_grad_norm)
    elif float(clip) != float(update_cfg.max_grad_norm):
        note(f"DeepSpeed clips gradients at its gradient_clipping={clip}, not update.max_grad_norm="
             f"{update_cfg.max_grad_norm}: set them equal in the accelerate config to clip where the config says.")


# ---- checkpoints ----------------------------------------------------------------------------------------


def full_state(accelerator, model, optimizer) -> tuple[dict | None, Any]:
    """(full weights or None, optimizer state) for a checkpoint; every rank calls it (gathers are collectives).

    Unsharded (one process, DDP): None (rank 0 saves its model) and the optimizer's own state. FSDP2: the full
    weights and the full optimizer state gathered to rank 0 (CPU), keyed by parameter name, so the file does
    not depend on the world size. ZeRO-3: the weights accelerate gathers; the optimizer state is not kept."""
    if not sharded(model):
        return None, optimizer.state_dict()
    if fsdp2_modules(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
        return get_model_state_dict(model, options=opts), {"by_name": get_optimizer_state_dict(model, inner, options=opts)}
    return accelerator.get_state_dict(model), None


def load_optimizer(model, optimizer, state: Any) -> None:
    """Restore what full_state saved (after accelerator.prepare: FSDP2 shards the full state over the ranks)."""
    from rredcot.errors import UserError
    from rredcot.ui import note

    if state is None:
        note("the checkpoint holds no optimizer state (saved under DeepSpeed ZeRO-3): Adam's moments restart from zero.")
        return
    by_name = isinstance(state, dict) and set(state) == {"by_name"}
    if by_name or fsdp2_modules(model):
        if not by_name:
            raise UserError("This checkpoint's optimizer state was saved without FSDP2 and cannot be sharded. Resume it "
                            "with the launch it was made with (one process or DDP), or start a new run under FSDP2.")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state["by_name"],
                                 options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


# ---- the step's records, gathered for metrics and samples ---------------------------------------------


def gather_step(ro, ver, seg, credit):
    """The whole generation batch's (Rollout, Verified, Segmented, Credit) on every rank, rows in global order
    (rank 0's first), for the logged metrics and samples. Prompt tokens are left behind (nothing logged reads
    them); the value estimators' credit statistics are recomputed on the whole batch, the others (per-trace
    means over equal shares) averaged over ranks. One process: the records themselves."""
    if not active():
        return ro, ver, seg, credit
    from rredcot.stages.rollout import pad_cat
    from rredcot.types import Credit, Rollout, Segmented, Verified

    cpu = lambda t: t.detach().cpu()  # noqa: E731
    mine = ({k: cpu(getattr(ro, k)) for k in ("completion_ids", "completion_mask", "logprobs", "entropies", "truncated")},
            ro.texts, ro.samples, (cpu(ver.rewards), {k: cpu(v) for k, v in sorted(ver.per_func.items())}, cpu(ver.correct),
                                   ver.extractor), seg,
            (cpu(credit.advantages), cpu(credit.valid), dict(sorted(credit.stats.items())), credit.segment_credit, credit.values))
    parts = gather(mine)
    t = {k: [p[0][k] for p in parts] for k in mine[0]}
    n = sum(len(p[1]) for p in parts)
    g_ro = Rollout(torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, 0, dtype=torch.long),
                   pad_cat(t["completion_ids"]), pad_cat(t["completion_mask"]), pad_cat(t["logprobs"]),
                   pad_cat(t["entropies"]), torch.cat(t["truncated"]), [x for p in parts for x in p[1]],
                   [x for p in parts for x in p[2]], ro.group_size)
    vs = [p[3] for p in parts]
    g_ver = Verified(torch.cat([v[0] for v in vs]), {k: torch.cat([v[1][k] for v in vs]) for k in vs[0][1]},
                     torch.cat([v[2] for v in vs]), [x for v in vs for x in v[3]])
    g_seg = Segmented([b for p in parts for b in p[4].boundaries], [e for p in parts for e in p[4].think_end])
    cs = [p[5] for p in parts]
    stats = {k: sum(c[2][k] for c in cs) / len(cs) for k in cs[0][2]}
    lists = lambda i: None if cs[0][i] is None else [x for c in cs for x in c[i]]  # noqa: E731
    g_credit = Credit(pad_cat([c[0] for c in cs]), torch.cat([c[1] for c in cs]), stats, lists(3), lists(4))
    if g_credit.values is not None and g_credit.segment_credit is not None:  # value estimators: exact, not averaged
        from rredcot.stages.redistribute import credit_stats

        stats.update(credit_stats(g_credit.segment_credit, g_credit.values, g_ver))
    return g_ro, g_ver, g_seg, g_credit
