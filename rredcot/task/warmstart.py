"""The warm start: supervised training of the built-in model on traces the task generates.

Some traces are flawed on purpose (one wrong step, `flaw_rate`), so the starting policy has real but
imperfect accuracy and RL has something to fix. The result is cached under
`<cache_dir>/warmstart/<key>`, where the key hashes everything that affects it; later runs load it.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from rredcot.errors import UserError
from rredcot.task.arith import Flaws, generate
from rredcot.task.datasets import arith_spec
from rredcot.task.model import build_tiny, load_pretrained, load_tokenizer

CACHE_VERSION = 1  # bump when the warm start's code changes what it produces


def cache_key(cfg: Any) -> str:
    """Hash of the task, model and warm-start settings (and this code's version)."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("task", "model", "warmstart")}
    for k in ("train_size", "eval_size", "forcing_text", "closing_text"):  # these do not change the warm start
        parts["task"].pop(k, None)
    parts["version"] = CACHE_VERSION
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _batches(tokenizer, samples, batch_size: int, rng: random.Random):
    """Endless shuffled batches: (input_ids [B, L], attention [B, L], labels [B, L], prompt masked)."""
    eos = tokenizer.eos_token
    while True:
        order = list(range(len(samples)))
        rng.shuffle(order)
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [samples[i] for i in order[lo : lo + batch_size]]
            prompts = [len(tokenizer(s.prompt, add_special_tokens=False)["input_ids"]) for s in chunk]
            enc = tokenizer([s.prompt + s.meta["trace"] + eos for s in chunk], return_tensors="pt",
                            padding=True, padding_side="right", add_special_tokens=False)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            for row, p in enumerate(prompts):
                labels[row, :p] = -100  # learn the completion, not the prompt
            yield enc["input_ids"], enc["attention_mask"], labels


def train_warm_start(model: PreTrainedModel, tokenizer, cfg: Any, progress=None) -> list[float]:
    """Supervised fine-tuning on generated (partly flawed) traces; returns the loss curve."""
    ws = cfg.warmstart
    flaws = Flaws(ws.flaw_rate, ws.misconception_frac, ws.misconception_rate)
    samples = generate(arith_spec(cfg.task), "train", ws.examples, seed=ws.seed, flaws=flaws)
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=ws.lr, total_steps=ws.steps, pct_start=0.05)
    batches = _batches(tokenizer, samples, ws.batch_size, random.Random(ws.seed))
    model.train()
    losses = []
    task = progress.add_task("warm start (SFT)", total=ws.steps) if progress else None
    for _ in range(ws.steps):
        ids, attn, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress:
            progress.update(task, advance=1, description=f"warm start (SFT) loss {losses[-1]:.3f}")
    return losses


def load_policy(cfg: Any, progress=None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The starting policy and tokenizer: built-in (warm-started, cached) or a pretrained model."""
    tokenizer = load_tokenizer(cfg.model.name)
    if cfg.model.name != "builtin":
        return load_pretrained(cfg.model.name, cfg.model.dtype), tokenizer
    if not cfg.warmstart.enabled:
        return build_tiny(cfg.model, len(tokenizer), cfg.warmstart.seed), tokenizer
    if cfg.task.name != "builtin":
        raise UserError("The warm start trains on the built-in task's traces; with another task set "
                        "warmstart.enabled=false or use a pretrained model (model.name=...).")
    path = Path(cfg.cache_dir).expanduser() / "warmstart" / cache_key(cfg)
    if not (path / "config.json").exists():
        model = build_tiny(cfg.model, len(tokenizer), cfg.warmstart.seed)
        losses = train_warm_start(model, tokenizer, cfg, progress)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "warmstart.json").write_text(json.dumps({"loss_first": losses[0], "loss_last": losses[-1],
                                                        "config": OmegaConf.to_container(cfg.warmstart)}))
        if path.exists():  # a parallel run finished first; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(path)  # atomic: a killed run never leaves a half-written cache entry
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer
