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


def check_shape(cfg: Any) -> None:
    """The built-in model's attention splits model.hidden_size over model.heads, and rotary position
    embeddings rotate pairs of each head's dimensions: hidden_size / heads must be a whole, even number."""
    hidden, heads = cfg.hidden_size, cfg.heads
    if hidden % heads == 0 and (hidden // heads) % 2 == 0:
        return
    fits = [h for h in range(1, hidden // 2 + 1) if hidden % (2 * h) == 0]
    fit_heads = min(fits, key=lambda h: (abs(h - heads), -h)) if fits else None
    fit_hidden = max(2 * heads, hidden - hidden % (2 * heads))
    why = (
        f"does not divide into model.heads={heads} attention heads (each head gets hidden_size / heads dimensions)"
        if hidden % heads
        else f"gives each of model.heads={heads} attention heads {hidden // heads} dimensions, an odd number"
    )
    raise UserError(
        f"model.hidden_size={hidden} {why}; rotary position embeddings rotate pairs of a head's dimensions, so "
        "hidden_size / heads must be a whole, even number. Set "
        + (f"model.heads={fit_heads} or " if fit_heads else "")
        + f"model.hidden_size={fit_hidden}."
    )


def build_tiny(cfg: Any, vocab_size: int, seed: int) -> PreTrainedModel:
    """A randomly initialised small Llama or Qwen2 (the built-in policy before its warm start)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if cfg.arch not in _ARCHS:
        raise UserError(f"Unknown model.arch {cfg.arch!r}; the built-in model can be one of {', '.join(_ARCHS)}.")
    check_shape(cfg)
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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


def _local(name: str) -> Path | None:
    """The folder `name` means, if it names one (an existing path, or one written like a path)."""
    p = Path(name).expanduser()
    return p if p.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1 else None


def _hub_hint(name: str) -> str:
    return (
        "Is the hub reachable from here? Without it, download the model elsewhere (huggingface-cli download "
        f"{name} --local-dir DIR) and set model.name=DIR."
    )


def check_model_dir(name: str) -> None:
    """A local model folder exists and holds a config.json; hub names are left to the loaders."""
    local = _local(name)
    if local is None:
        return
    if not local.is_dir():
        raise UserError(
            f"model.name={name!r}: there is no folder {str(local)!r}. Set model.name to a folder saved with "
            "save_pretrained (config.json, weights, tokenizer), a hub id such as Qwen/Qwen2.5-0.5B-Instruct, "
            "or 'builtin'."
        )
    if not (local / "config.json").exists():
        raise UserError(
            f"model.name={name!r} has no config.json, so it is not a model saved with save_pretrained "
            f"(it holds: {', '.join(sorted(p.name for p in local.iterdir())[:8]) or 'nothing'}). Point it at "
            "the folder that has config.json and the weights."
        )


BUILTIN_MODEL = "builtin"  # model.name of the tiny model this project builds (conf/model/builtin.yaml)


def is_builtin(name: str) -> bool:
    """Whether model.name is the built-in model (built from its config and warm-started), not pretrained weights:
    the one place that decides it."""
    return name == BUILTIN_MODEL


REMOTE_CODE_FIX = (
    "rredcot never answers transformers' trust_remote_code prompt for you (it would hang a batch job). If you "
    "trust the code, say so on your own command line: model.trust_remote_code=true; otherwise choose a model "
    "that transformers supports natively."
)


def trusts_remote_code(cfg) -> bool:
    """model.trust_remote_code of a composed config (runs from before the key: False)."""
    return bool(cfg.model.get("trust_remote_code", False))


def _remote_code_error(name: str, e: Exception) -> UserError | None:
    """The error for a model that ships its own Python code (config.json's auto_map), else None."""
    if "trust_remote_code" not in str(e):
        return None
    return UserError(f"model.name={name!r} ships its own Python code, which loading it would run. {REMOTE_CODE_FIX}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model; left padding, and a pad token (the EOS) where the model has none.
    trust_remote_code is always passed (False by default): transformers never prompts [y/N] on stdin."""
    if is_builtin(name_or_path):
        tok = build_char_tokenizer()
    else:
        check_model_dir(name_or_path)
        local = _local(name_or_path)
        if local is not None and not any((local / f).exists() for f in _TOKENIZER_FILES):
            raise UserError(
                f"model.name={name_or_path!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}). "
                "Save it next to the weights: AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(DIR)."
            )
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except Exception as e:
            if (remote := _remote_code_error(name_or_path, e)) is not None:
                raise remote from None
            raise UserError(
                f"Could not load the tokenizer of {name_or_path!r}: {_first_line(e)} "
                + ("" if local else _hub_hint(name_or_path))
            ) from None
    if tok.eos_token is None or _eos_invented(tok):
        raise UserError(_no_eos(name_or_path, tok))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _eos_invented(tok: PreTrainedTokenizerBase) -> bool:
    """Whether the EOS token is one the loader made up (transformers' backend falls back to a default such as
    '<|endoftext|>' when the files name none): in neither the vocabulary nor the files' added tokens, so the
    model has never seen it and would never write it."""
    eid = tok.eos_token_id
    return eid is not None and eid >= tok.vocab_size and eid not in (tok.init_kwargs.get("added_tokens_decoder") or {})


def _no_eos(name: str, tok: PreTrainedTokenizerBase) -> str:
    """The message for a tokenizer without an EOS token of its own, naming the one the model ends with if known."""
    ends = _model_eos_token(name, tok)
    fix = (
        f'add "eos_token": "{ends}" (the token its generation_config.json / config.json ends sequences with) to '
        "its tokenizer_config.json"
        if ends
        else "name the token the model ends its sequences with as eos_token in its tokenizer_config.json"
    )
    return (
        f"The tokenizer of {name!r} names no end-of-sequence (EOS) token"
        + (f" (transformers made up {tok.eos_token!r}, which is not in its vocabulary)" if tok.eos_token else "")
        + f", so completions could never end. Save the model's own tokenizer next to it, or {fix}."
    )


def _model_eos_token(name: str, tok: PreTrainedTokenizerBase) -> str | None:
    import json

    local = _local(name)
    for f in ("generation_config.json", "config.json") if local else ():
        try:
            eid = json.loads((local / f).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        eid = eid[0] if isinstance(eid, list) and eid else eid
        if isinstance(eid, int) and 0 <= eid < tok.vocab_size:
            return tok.convert_ids_to_tokens(eid)
    return None


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _check_causal(name: str, trust_remote_code: bool = False) -> None:
    """Refuse encoder-only and encoder-decoder models before their weights load (they would crash later)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:
        if (remote := _remote_code_error(name, e)) is not None:
            raise remote from None
        raise UserError(
            f"Could not read the config of model {name!r}: {_first_line(e)} "
            + ("" if _local(name) else _hub_hint(name))
        ) from None
    archs = list(getattr(config, "architectures", None) or [])
    causal = any("CausalLM" in a or "LMHead" in a for a in archs) if archs else True
    if getattr(config, "is_encoder_decoder", False) or not causal:
        raise UserError(
            f"model.name={name!r} is a {', '.join(archs) or config.model_type} model, not a causal (decoder-only) "
            "language model, so it cannot generate completions. Choose a causal LM (its config.json lists "
            "an architecture ending in ForCausalLM), e.g. Qwen/Qwen2.5-0.5B-Instruct."
        )


def load_pretrained(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False) -> PreTrainedModel:
    """Any AutoModelForCausalLM by hub name or local directory, with a clear error when it is not there.
    (trust_remote_code passed explicitly: checked against transformers 5.2x's resolve_trust_remote_code, which
    prompts on stdin only when it is None.)"""
    if dtype not in _DTYPES:
        raise UserError(f"Unknown model.dtype {dtype!r}; use one of {', '.join(_DTYPES)}.")
    check_model_dir(name_or_path)
    _check_causal(name_or_path, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except Exception as e:
        if (remote := _remote_code_error(name_or_path, e)) is not None:
            raise remote from None
        raise UserError(
            f"Could not load model {name_or_path!r}: {_first_line(e)} "
            + ("Check that its weights are complete." if _local(name_or_path) else _hub_hint(name_or_path))
        ) from None


def check_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Every token id the tokenizer can produce has a row in the model's embedding table."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        extra = tokenizer.convert_ids_to_tokens(list(range(rows, min(len(tokenizer), rows + 4))))
        raise UserError(
            f"The tokenizer of {name!r} has {len(tokenizer)} tokens, but the model's embedding has {rows} "
            f"rows, so tokens from id {rows} on ({', '.join(map(repr, extra))}"
            f"{', ...' if len(tokenizer) > rows + 4 else ''}) have none: they are not a pair. Save the model's "
            "own tokenizer in its folder."
        )
