"""LoRA through peft (`model.lora.r > 0`; install with `pip install 'rredcot[peft]'`).

Only the adapter trains. The KL reference (update.beta > 0) is the same network with the adapter
switched off, so no second copy of the model is loaded. A checkpoint holds the merged weights (a plain
transformers model that every loader, `rredcot eval` included, opens as is) and the adapter alone in
`adapter/` (for peft users, and for resuming the run on its base model).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch

from rredcot.errors import UserError

ADAPTER_DIR = "adapter"


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError(
            "model.lora.r > 0 needs peft: pip install 'rredcot[peft]' (or pip install peft), or set "
            "model.lora.r=0 to fine-tune every weight."
        ) from None
    return peft


def base_model(model):
    """The transformers model inside a peft wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enabled(cfg: Any) -> bool:
    return bool((cfg.model.get("lora") or {}).get("r", 0))


def wrap(model, cfg: Any, resume_from: Path | None = None):
    """The policy with a trainable LoRA adapter: a fresh one, or the one saved in a checkpoint."""
    peft = _peft()
    with warnings.catch_warnings():  # peft reads transformers' renamed is_gradient_checkpointing: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if resume_from is not None:
            return peft.PeftModel.from_pretrained(model, str(resume_from / ADAPTER_DIR), is_trainable=True)
        lc = cfg.model.lora
        config = peft.LoraConfig(
            r=lc.r,
            lora_alpha=lc.alpha,
            lora_dropout=lc.dropout,
            target_modules=list(lc.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            return peft.get_peft_model(model, config)
        except ValueError as e:  # peft's NoMatchingPeftModuleError is one
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise UserError(
                f"model.lora.target_modules={list(lc.target_modules)}: {str(e).splitlines()[0]} This model's "
                f"linear layers are named: {', '.join(names)}."
            ) from None


class AdapterOff:
    """The KL reference: calls go to the policy with its adapter disabled (no gradients, no copy)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()


def save(model, path: Path, tokenizer) -> None:
    """Merged weights (plain transformers) in `path`, the adapter alone in `path/adapter`."""
    model.save_pretrained(path / ADAPTER_DIR)
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)
