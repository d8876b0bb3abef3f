"""The policy's training setup: AdamW and its schedule, activation checkpointing, regional compilation, and
the precision / train-mode context of the gradient passes."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from rredcot.errors import UserError
from rredcot.lora import base_model


def build_optimizer(model, cfg, total_steps: int):
    """AdamW and a warmup + constant/cosine schedule over `total_steps` optimizer steps."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
        eps=cfg.adam_eps,
    )
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    kind = {"constant": "constant_with_warmup", "cosine": "cosine"}[cfg.schedule]
    return opt, get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total_steps)


@contextmanager
def grad_mode(model, autocast: str | None = None):
    """Train mode for the gradient passes when activations are checkpointed (transformers checkpoints only
    in train mode); every other pass (rollout, probes: KV caches) keeps the model as it was. With
    `autocast` the passes compute in that dtype; the log-probs are taken from fp32 logits either way."""
    unwrapped = getattr(model, "module", model)
    was = model.training
    device = next(model.parameters()).device.type
    cast = torch.autocast(device, dtype=getattr(torch, autocast)) if autocast else nullcontext()
    on = getattr(unwrapped, "is_activation_checkpointing", None)  # transformers 5 (also through a peft wrapper)
    if on is None:
        on = getattr(unwrapped, "is_gradient_checkpointing", False)
    if on:
        model.train()
    try:
        with cast:
            yield
    finally:
        model.train(was)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers 5 renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place (regional compilation: one small graph reused by every
    layer, so the first step compiles in seconds to minutes, not the whole model). Shapes are dynamic
    (lengths change every step); parameter names, checkpoints and results are unchanged (tested).
    Returns the number of layers compiled."""
    base = base_model(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise UserError(
            f"update.compile=true compiles the decoder layers (model.model.layers), which "
            f"{type(base).__name__} does not have. Set update.compile=false."
        )
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
