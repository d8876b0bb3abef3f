"""Policy models: the built-in tiny Llama/Qwen2 made from a config, or any causal LM by name or path."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from rredcot.errors import UserError
from rredcot.task.tokenizer import build_char_tokenizer

hf_logging.disable_progress_bar()  # our own progress bars are enough

_ARCHS = ("llama", "qwen2")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny(cfg: Any, vocab_size: int, seed: int) -> PreTrainedModel:
    """A randomly initialised small Llama or Qwen2 (the built-in policy before its warm start)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if cfg.arch not in _ARCHS:
        raise UserError(f"Unknown model.arch {cfg.arch!r}; the built-in model can be one of {', '.join(_ARCHS)}.")
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if cfg.arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return model_cls(config)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model; left padding, and a pad token (the EOS) where the model has none."""
    if name_or_path == "builtin":
        tok = build_char_tokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_pretrained(name_or_path: str, dtype: str = "float32") -> PreTrainedModel:
    """Any AutoModelForCausalLM by hub name or local directory, with a clear error when it is not there."""
    if dtype not in _DTYPES:
        raise UserError(f"Unknown model.dtype {dtype!r}; use one of {', '.join(_DTYPES)}.")
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_DTYPES[dtype])
    except OSError as e:
        where = "local directory" if Path(name_or_path).exists() else "hub name (is the hub reachable from here?)"
        raise UserError(
            f"Could not load model {name_or_path!r} as a {where}: {str(e).splitlines()[0]} "
            "Set model.name to a local directory saved with save_pretrained, a reachable hub id, or 'builtin'."
        ) from None
