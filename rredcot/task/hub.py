"""The `hf` task: datasets by hub name (`datasets.load_dataset`) or local jsonl/json/parquet/csv files, one
*source* per split (task.sources.train / .test / .dev). A source without a `dev` of its own gets a
deterministic dev split carved out of the training rows (rredcot.task.splits), never trained on.
Every task entry is (cfg, split, tokenizer) -> list[Sample], for split in train / dev / test.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from rredcot import ranges
from rredcot.errors import UserError
from rredcot.ranges import COUNT, FRACTION, NATURAL, one_of, optional
from rredcot.registry import register
from rredcot.task.conversation import apply_template, is_conversational, render
from rredcot.task.rows import diagnose_file, load_error, not_a_file, not_text
from rredcot.task.splits import carve_dev
from rredcot.types import Sample
from rredcot.ui import note

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SOURCE_KEYS = ("path", "config_name", "split", "question_field", "answer_field", "answer_format", "trace_field")


def gold_from(answer: str, fmt: str) -> str:
    """The gold answer in a dataset field ("" when there is none: the row is then counted as bad).

    'gsm8k': the text after '####', commas removed ('... #### 1,234' -> '1234');
    'boxed': the content of the last \\boxed{...} (nested braces kept); 'plain': the field as is;
    'auto' (an open-r1 `solution`, a worked solution or a bare answer): boxed if it has \\boxed{, else plain.
    """
    if fmt == "auto":
        return gold_from(answer, "boxed" if "\\boxed{" in answer else "plain")
    if fmt == "gsm8k":
        return answer.split("####")[-1].strip().replace(",", "") if "####" in answer else ""
    if fmt == "boxed":
        start = answer.rfind("\\boxed{")
        if start < 0:
            return ""
        depth, i = 0, start + len("\\boxed{")
        for j in range(i, len(answer)):
            depth += {"{": 1, "}": -1}.get(answer[j], 0)
            if depth < 0:
                return answer[i:j].strip()
        return ""
    if fmt == "plain":
        return str(answer).strip()
    raise UserError(f"Unknown task.answer_format {fmt!r}; use gsm8k, boxed, plain or auto.")


def solution_text(trace: str, fmt: str) -> str:
    """A dataset's reference solution as the reference-solution bank reads it (stages/bank.py): its reasoning
    without the final answer. 'gsm8k': the text before '####', calculator notes '<<48/2=24>>' removed (no
    model writes them); 'boxed': the lines before the one holding the last \\boxed{...}; 'plain': as is.
    Example (gsm8k): 'She sold 48/2 = <<48/2=24>>24 clips.\n#### 72' -> 'She sold 48/2 = 24 clips.\n'."""
    text = re.sub(r"<<[^<>]*>>", "", trace)
    if fmt == "gsm8k" and "####" in text:
        text = text[: text.rfind("####")]
    elif fmt == "boxed" and "\\boxed{" in text:
        text = text[: text.rfind("\n", 0, text.rfind("\\boxed{")) + 1]
    return text.strip() + "\n" if text.strip() else ""


def format_prompt(question: Any, cfg: Any, tokenizer: Any) -> str:
    """The question plus the task's instruction, through the model's chat template when it has one; a
    conversation (TRL's list of chat messages, task/conversation.py) is rendered as it is, with no instruction."""
    if is_conversational(question):
        return render(question, cfg, tokenizer)
    text = f"{question}\n{cfg.instruction}".strip() if cfg.instruction else question
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        return apply_template([{"role": "user", "content": text}], cfg, tokenizer)
    return text + "\n"


def source_of(cfg: Any, split: str) -> dict[str, Any] | None:
    """The split's source: the task's top-level keys, overridden by task.sources.<split>; None if absent.

    Example: path=openai/gsm8k, sources.test={split: test} -> {path: openai/gsm8k, split: test, ...}."""
    over = (cfg.get("sources") or {}).get(split)
    if over is None or (over.get("path") is None and over.get("split") is None):
        return None
    src = {k: cfg.get(k) for k in _SOURCE_KEYS}
    src.update({k: v for k, v in dict(over).items() if v is not None})
    unknown = set(dict(over)) - set(_SOURCE_KEYS)
    if unknown:
        raise UserError(
            f"task.sources.{split} has unknown key(s) {sorted(unknown)}; a source takes {', '.join(_SOURCE_KEYS)}."
        )
    return src


@lru_cache(maxsize=8)
def load_rows(path: str, config_name: str | None, split: str) -> list[dict[str, Any]]:
    """The rows of a whole local file (any split name), or of one split of a hub dataset."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our message says what went wrong
    local = Path(path).expanduser()
    try:
        if local.suffix in _LOCAL_FORMATS:  # its existence is checked by the caller (naming the key that set it)
            ds = datasets.load_dataset(_LOCAL_FORMATS[local.suffix], data_files=str(local), split="train")
        else:
            ds = datasets.load_dataset(path, config_name, split=split)
        return ds.to_list()  # decodes every row now, so a bad byte is found here and not mid-run
    except UserError:
        raise
    except Exception as e:  # hub unreachable, unknown split, bad file: one clear paragraph, not a traceback
        raise load_error(path, split, e) from None


def _rows_to_samples(rows: Any, src: dict[str, Any], cfg: Any, tokenizer: Any, where: str) -> list[Sample]:
    """Rows -> Samples; rows without a question or a gold answer are skipped and counted (refused above
    task.max_bad_fraction, so a wrong answer_format cannot train on nothing)."""
    columns = list(rows[0]) if rows else []
    # answer_field null: open-r1's convention, the gold in `solution`, else in `answer`
    src = {**src, "answer_field": src["answer_field"] or next((c for c in GOLD_COLUMNS if c in columns), "solution")}
    missing = [f for f in (src["question_field"], src["answer_field"]) if f not in columns]
    local = Path(str(src["path"])).expanduser()
    why = diagnose_file(local) if missing and local.is_file() else None
    if why:
        raise UserError(f"{where}: {why}.")
    if missing:
        raise UserError(
            f"{where} has no field(s) {missing}; it has {columns}. Set task.question_field and "
            "task.answer_field (or task.sources.<split>.question_field / answer_field) to the right names."
        )
    odd = not_text(rows, src, where, cfg.get("max_bad_fraction", 0.01))
    out, bad = [], []
    for i, row in enumerate(rows):
        if i in odd:
            continue
        q, a = row[src["question_field"]], row[src["answer_field"]]
        gold = gold_from(str(a), src["answer_format"]) if a is not None else ""
        if q is None or not (q if is_conversational(q) else str(q).strip()) or not gold:
            bad.append(i)
            continue
        out.append(_sample(i, row, q, gold, src, cfg, tokenizer))
    if bad and len(bad) > cfg.get("max_bad_fraction", 0.01) * max(len(rows), 1):
        raise UserError(
            f"{where}: {len(bad)} of {len(rows)} rows have no question or no gold answer in the "
            f"{src['answer_format']!r} format (rows {bad[:8]}{' ...' if len(bad) > 8 else ''}). Check "
            "task.answer_format (gsm8k needs '#### <answer>', boxed needs \\boxed{...}) and the field names."
        )
    if bad:
        note(f"{where}: skipped {len(bad)} row(s) without a question or gold answer (rows {bad[:8]}).")
    return out


GOLD_COLUMNS = ("solution", "answer")


def _sample(i: int, row: dict[str, Any], q: Any, gold: str, src: dict[str, Any], cfg: Any, tokenizer: Any) -> Sample:
    """One row as a Sample. meta keeps what TRL-style reward functions are given (stages/reward_funcs.py): the
    dataset's own prompt and every other column by name."""
    trace = row.get(src["trace_field"]) if src.get("trace_field") else None
    meta = {
        "row": i,
        **({"trace": str(trace), "solution": solution_text(str(trace), src["answer_format"])} if trace else {}),
        "prompt": q,
        "columns": {k: v for k, v in row.items() if k != src["question_field"]},
    }
    prompt = format_prompt(q if is_conversational(q) else re.sub(r"\s+$", "", str(q)), cfg, tokenizer)
    return Sample(prompt=prompt, gold=gold, meta=meta)


def _source_samples(cfg: Any, split: str, tokenizer: Any) -> list[Sample]:
    src = source_of(cfg, split)
    key = "task.path" if cfg.get("sources", {}).get(split, {}).get("path") is None else f"task.sources.{split}.path"
    if src["path"] is None:
        raise UserError(
            f"{key} is not set, so the {split} split has no data. Set it to a local jsonl/json/parquet/csv file "
            f"or a hub dataset name, e.g. {key}=train.jsonl."
        )
    local = Path(str(src["path"])).expanduser()
    if local.suffix in _LOCAL_FORMATS and not local.is_file():
        raise UserError(f"{key}={src['path']}: {not_a_file(local)}")
    rows = load_rows(str(src["path"]), src["config_name"], str(src["split"] or split))
    return _rows_to_samples(rows, src, cfg, tokenizer, f"task.sources.{split} ({src['path']}, split {src['split']})")


HF_RULES = {
    "answer_format": one_of("gsm8k", "boxed", "plain", "auto"),
    "dev_size": NATURAL,
    "max_bad_fraction": FRACTION,
    "train_size": optional(COUNT),
    "eval_size": optional(COUNT),
}


def _check_hf(cfg: Any, prefix: str) -> None:
    sources = cfg.get("sources") or {}
    for split in sources:
        if split not in ("train", "dev", "test"):
            raise UserError(f"{prefix}sources.{split}: the splits are train, dev and test; rename or remove it.")
        source_of(cfg, split)  # unknown keys in a source are refused there
        ranges.check(
            sources[split] or {}, {"answer_format": optional(HF_RULES["answer_format"])}, f"{prefix}sources.{split}."
        )


@register("task", "hf", HF_RULES, check=_check_hf)
def hf_task(cfg: Any, split: str, tokenizer: Any) -> list[Sample]:
    """Rows of the split's source; dev without its own source is carved out of the training rows."""
    if source_of(cfg, split) is None and split != "dev":
        raise UserError(
            f"task.sources.{split} is not set, so this task has no {split} split. Give it one "
            f"(task.sources.{split}.path=FILE or task.sources.{split}.split=NAME), or choose another eval.split."
        )
    if split == "dev" and source_of(cfg, "dev") is None:
        samples = carve_dev(_source_samples(cfg, "train", tokenizer), cfg.dev_size)[1]
    elif split == "train" and source_of(cfg, "dev") is None:
        samples = carve_dev(_source_samples(cfg, "train", tokenizer), cfg.dev_size)[0]
    else:
        samples = _source_samples(cfg, split, tokenizer)
    limit = cfg.train_size if split == "train" else cfg.eval_size
    return samples[:limit] if limit else samples
