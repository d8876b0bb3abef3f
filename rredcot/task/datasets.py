"""The `task` registry: where problems come from. Every entry is (cfg, split, tokenizer) -> list[Sample].

- `builtin`: the arithmetic-chain task made from a seed (rredcot.task.arith).
- `hf`: any dataset by hub name (`datasets.load_dataset`) or a local jsonl/json/parquet/csv file with
  the same fields: openai/gsm8k, HuggingFaceH4/MATH-500, AI-MO/NuminaMath-CoT, knoveleng/open-rs.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rredcot.errors import UserError
from rredcot.registry import register
from rredcot.task.arith import ArithSpec, generate
from rredcot.types import Sample

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def arith_spec(cfg: Any) -> ArithSpec:
    return ArithSpec(steps=cfg.steps, max_value=cfg.max_value, max_operand=cfg.max_operand,
                     ops=cfg.ops, distractors=cfg.distractors, shuffle=cfg.shuffle)


@register("task", "builtin")
def builtin_task(cfg: Any, split: str, tokenizer: Any = None) -> list[Sample]:
    """`split` is train / dev / test; sizes come from cfg.train_size and cfg.eval_size."""
    n = cfg.train_size if split == "train" else cfg.eval_size
    return generate(arith_spec(cfg), split, n, seed=cfg.seed)


def gold_from(answer: str, fmt: str) -> str:
    """The gold answer in a dataset field.

    'gsm8k': the text after '####', commas removed ('... #### 1,234' -> '1234');
    'boxed': the content of the last \\boxed{...} (nested braces kept); 'plain': the field as is.
    """
    if fmt == "gsm8k":
        return answer.split("####")[-1].strip().replace(",", "")
    if fmt == "boxed":
        start = answer.rfind("\\boxed{")
        if start < 0:
            return ""  # the verifier then finds the gold unparseable and skips the row
        depth, i = 0, start + len("\\boxed{")
        for j in range(i, len(answer)):
            depth += {"{": 1, "}": -1}.get(answer[j], 0)
            if depth < 0:
                return answer[i:j].strip()
        return ""
    if fmt == "plain":
        return str(answer).strip()
    raise UserError(f"Unknown task.answer_format {fmt!r}; use gsm8k, boxed or plain.")


def format_prompt(question: str, cfg: Any, tokenizer: Any) -> str:
    """The question plus the task's instruction, through the model's chat template when it has one."""
    text = f"{question}\n{cfg.instruction}".strip() if cfg.instruction else question
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text + "\n"


def _load_rows(cfg: Any, split: str) -> Any:
    import datasets

    path = str(cfg.path)
    local = Path(path).expanduser()
    try:
        if local.suffix in _LOCAL_FORMATS:
            if not local.exists():
                raise UserError(f"Data file {str(local)!r} does not exist. Set task.path to an existing "
                                f"jsonl/json/parquet/csv file, or to a hub dataset name.")
            return datasets.load_dataset(_LOCAL_FORMATS[local.suffix], data_files=str(local), split="train")
        return datasets.load_dataset(path, cfg.config_name, split=split)
    except UserError:
        raise
    except Exception as e:  # hub unreachable, unknown split, ...: one clear paragraph, not a traceback
        raise UserError(f"Could not load dataset {path!r} (split {split!r}): {str(e).splitlines()[0]} "
                        "Set task.path to a local file with the same fields, or check the name and split.") from None


@register("task", "hf")
def hf_task(cfg: Any, split: str, tokenizer: Any) -> list[Sample]:
    """Rows of a hub or local dataset; `split` train maps to cfg.train_split, others to cfg.eval_split."""
    rows = _load_rows(cfg, cfg.train_split if split == "train" else cfg.eval_split)
    missing = [f for f in (cfg.question_field, cfg.answer_field) if f not in rows.column_names]
    if missing:
        raise UserError(f"Dataset {cfg.path!r} has no field(s) {missing}; it has {rows.column_names}. "
                        "Set task.question_field and task.answer_field to the right names.")
    limit = cfg.train_size if split == "train" else cfg.eval_size
    out = []
    for row in rows.select(range(min(limit or len(rows), len(rows)))):
        q = re.sub(r"\s+$", "", str(row[cfg.question_field]))
        out.append(Sample(prompt=format_prompt(q, cfg, tokenizer), gold=gold_from(str(row[cfg.answer_field]), cfg.answer_format)))
    return out
