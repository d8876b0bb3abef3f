"""The warm start: supervised training of the built-in model on a task's reference traces.

The built-in task writes its own traces, some flawed on purpose (one wrong step, `flaw_rate`), so the
starting policy has real but imperfect accuracy and RL has something to fix. Any other task warms up on
its training rows' reference traces (Sample.meta["trace"]: a plug-in task sets it; hub tasks read
task.trace_field), or the hook its entry declares (`@register("task", name, warmstart=fn)`, called as
fn(cfg, tokenizer)). The result is cached under `<cache_dir>/warmstart/<key>`, where the key hashes
everything that affects it, the traces included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from rredcot.errors import UserError
from rredcot.task.model import build_tiny, check_fits, is_builtin, load_pretrained, load_tokenizer, trusts_remote_code
from rredcot.task.rows import check_samples

try:  # POSIX; elsewhere two parallel runs may both train the same entry (correct, only slower)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

CACHE_VERSION = 1  # bump when the warm start's code changes what it produces


def cache_key(cfg: Any, samples: list | None = None) -> str:
    """Hash of the task, model and warm-start settings, this code's version and the traces themselves
    (a task's data file can change under the same config)."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("task", "model", "warmstart")}
    for k in ("train_size", "eval_size", "forcing_text", "closing_text"):  # these do not change the warm start
        parts["task"].pop(k, None)
    parts["version"] = CACHE_VERSION
    if samples is not None:
        parts["data"] = hashlib.sha256("\0".join(s.prompt + s.meta["trace"] for s in samples).encode()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def warmstart_samples(cfg: Any, tokenizer) -> list:
    """The task's warm-start traces (its own hook, else its training rows with reference traces),
    checked to fit the built-in tokenizer and model."""
    from rredcot.registry import entry

    task = entry("task", cfg.task.name)  # its declared warm-start hook, or its training rows' traces
    samples = check_samples(
        cfg.task.name,
        "train" if not task.warmstart else "warm-start",
        task.warmstart(cfg, tokenizer) if task.warmstart else task.obj(cfg.task, "train", tokenizer),
    )
    samples = [s for s in samples if isinstance(s.meta.get("trace"), str) and s.meta["trace"]]
    if not samples:
        raise UserError(
            f"The task {cfg.task.name!r} has no reference traces to warm-start the built-in model on. Give its "
            "training rows traces (Sample.meta['trace'] in a plug-in task, task.trace_field for hub/local "
            "data), or start from a pretrained model (model.name=PATH warmstart.enabled=false)."
        )
    samples = samples[: cfg.warmstart.examples]
    texts = [s.prompt + s.meta["trace"] for s in samples]
    chars = set("".join(texts)) if is_builtin(cfg.model.name) else set()
    unknown = sorted(ch for ch in chars if tokenizer.convert_tokens_to_ids(ch) == tokenizer.unk_token_id)
    if unknown:
        raise UserError(
            f"The task's text has characters the built-in tokenizer does not know: {''.join(unknown[:20])!r}. "
            "Keep the task to printable ASCII, or use a pretrained model (model.name=PATH)."
        )
    widest = sorted(texts, key=len)[-64:]  # tokenizing all 20k traces costs seconds; the longest texts suffice
    longest = max(len(ids) for ids in tokenizer(widest, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    if longest > cfg.model.get("max_positions", longest):
        raise UserError(
            f"The task's warm-start traces are up to {longest} tokens, longer than the built-in model's "
            f"model.max_positions={cfg.model.max_positions}. Raise model.max_positions (e.g. "
            f"model.max_positions={2 ** (longest - 1).bit_length()}) or shorten the traces."
        )
    if len(samples) < cfg.warmstart.batch_size:
        raise UserError(
            f"The task has {len(samples)} warm-start traces, fewer than warmstart.batch_size="
            f"{cfg.warmstart.batch_size}. Lower warmstart.batch_size (e.g. {max(len(samples) // 2, 1)}) or add traces."
        )
    return samples


def _batches(tokenizer, samples, batch_size: int, rng: random.Random):
    """Endless shuffled batches: (input_ids [B, L], attention [B, L], labels [B, L], prompt masked)."""
    eos = tokenizer.eos_token
    while True:
        order = list(range(len(samples)))
        rng.shuffle(order)
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [samples[i] for i in order[lo : lo + batch_size]]
            prompts = [len(tokenizer(s.prompt, add_special_tokens=False)["input_ids"]) for s in chunk]
            enc = tokenizer(
                [s.prompt + s.meta["trace"] + eos for s in chunk],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                add_special_tokens=False,
            )
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            for row, p in enumerate(prompts):
                labels[row, :p] = -100  # learn the completion, not the prompt
            yield enc["input_ids"], enc["attention_mask"], labels


def train_warm_start(model: PreTrainedModel, tokenizer, cfg: Any, samples: list, progress=None) -> list[float]:
    """Supervised fine-tuning on the task's traces; returns the loss curve."""
    ws = cfg.warmstart
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


@contextlib.contextmanager
def exclusive(lock: Path):
    """An exclusive lock on the file `lock` for the block, waiting for it if another process holds it
    (flock: released by the kernel if the holder dies, so never stale). runlock.RunLock refuses instead of
    waiting, for one writer per run directory."""
    with open(lock, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _train_into(path: Path, cfg: Any, tokenizer, samples: list, progress) -> None:
    """Warm-start a fresh model and write it to `path` atomically: a killed run never leaves half an entry."""
    model = build_tiny(cfg.model, len(tokenizer), cfg.warmstart.seed)
    losses = train_warm_start(model, tokenizer, cfg, samples, progress)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # one per process: a second writer cannot clobber it
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"loss_first": losses[0], "loss_last": losses[-1], "config": OmegaConf.to_container(cfg.warmstart)}
    (tmp / "warmstart.json").write_text(json.dumps(info))
    if path.exists():  # written by a process that does not lock (an older rredcot): its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(path)


def load_policy(cfg: Any, progress=None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The starting policy and tokenizer: built-in (warm-started, cached) or a pretrained model."""
    remote = trusts_remote_code(cfg)
    tokenizer = load_tokenizer(cfg.model.name, remote)
    if not is_builtin(cfg.model.name):
        model = load_pretrained(cfg.model.name, cfg.model.dtype, remote)
        check_fits(model, tokenizer, cfg.model.name)
        return model, tokenizer
    if not cfg.warmstart.enabled:
        return build_tiny(cfg.model, len(tokenizer), cfg.warmstart.seed), tokenizer
    samples = warmstart_samples(cfg, tokenizer)
    path = Path(cfg.cache_dir).expanduser() / "warmstart" / cache_key(cfg, samples)
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(path.with_name(path.name + ".lock")):  # parallel runs of one sweep: one trains, the rest wait
            if not (path / "config.json").exists():  # (another process may have written it while we waited)
                _train_into(path, cfg, tokenizer, samples, progress)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer
