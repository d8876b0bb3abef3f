"""The `task` registry: where problems come from. Every entry is (cfg, split, tokenizer) -> list[Sample],
for split in train / dev / test; the three must be disjoint (the pipeline refuses overlaps, see
`check_disjoint`).

- `builtin`: the arithmetic-chain task made from a seed (rredcot.task.arith), split by prompt hash.
- `hf`: datasets by hub name (`datasets.load_dataset`) or local jsonl/json/parquet/csv files, one
  *source* per split (task.sources.train / .test / .dev). A source without a `dev` of its own gets a
  deterministic dev split carved out of the training rows (the `dev_size` rows whose question hashes
  lowest), and those rows are never trained on.
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from rredcot.errors import UserError
from rredcot.registry import register
from rredcot.task.arith import ArithSpec, generate
from rredcot.types import Sample
from rredcot.ui import note

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SOURCE_KEYS = ("path", "config_name", "split", "question_field", "answer_field", "answer_format", "trace_field")


def arith_spec(cfg: Any) -> ArithSpec:
    return ArithSpec(steps=cfg.steps, max_value=cfg.max_value, max_operand=cfg.max_operand,
                     ops=cfg.ops, distractors=cfg.distractors, shuffle=cfg.shuffle)


@register("task", "builtin")
def builtin_task(cfg: Any, split: str, tokenizer: Any = None) -> list[Sample]:
    """`split` is train / dev / test; sizes come from cfg.train_size and cfg.eval_size."""
    n = cfg.train_size if split == "train" else cfg.eval_size
    return generate(arith_spec(cfg), split, n, seed=cfg.seed)


def _builtin_warmstart(cfg: Any, tokenizer: Any = None) -> list[Sample]:
    """The built-in task writes its own warm-start traces, some flawed on purpose (see task.warmstart)."""
    from rredcot.task.arith import Flaws

    ws = cfg.warmstart
    flaws = Flaws(ws.flaw_rate, ws.misconception_frac, ws.misconception_rate)
    return generate(arith_spec(cfg.task), "train", ws.examples, seed=ws.seed, flaws=flaws)


# A task entry may carry `warmstart_samples(cfg, tokenizer) -> list[Sample]` (each with meta["trace"]);
# without it, the warm start uses the training rows that have reference traces (task.warmstart).
builtin_task.warmstart_samples = _builtin_warmstart


def gold_from(answer: str, fmt: str) -> str:
    """The gold answer in a dataset field ("" when there is none: the row is then counted as bad).

    'gsm8k': the text after '####', commas removed ('... #### 1,234' -> '1234');
    'boxed': the content of the last \\boxed{...} (nested braces kept); 'plain': the field as is.
    """
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
    raise UserError(f"Unknown task.answer_format {fmt!r}; use gsm8k, boxed or plain.")


def format_prompt(question: str, cfg: Any, tokenizer: Any) -> str:
    """The question plus the task's instruction, through the model's chat template when it has one."""
    text = f"{question}\n{cfg.instruction}".strip() if cfg.instruction else question
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
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
        raise UserError(f"task.sources.{split} has unknown key(s) {sorted(unknown)}; a source takes {', '.join(_SOURCE_KEYS)}.")
    return src


@lru_cache(maxsize=8)
def load_rows(path: str, config_name: str | None, split: str) -> Any:
    """A `datasets.Dataset`: a whole local file (any split name), or one split of a hub dataset."""
    import datasets

    local = Path(path).expanduser()
    try:
        if local.suffix in _LOCAL_FORMATS:
            if not local.exists():
                raise UserError(f"Data file {str(local)!r} does not exist. Set task.path (or task.sources.<split>.path) "
                                "to an existing jsonl/json/parquet/csv file, or to a hub dataset name.")
            return datasets.load_dataset(_LOCAL_FORMATS[local.suffix], data_files=str(local), split="train")
        return datasets.load_dataset(path, config_name, split=split)
    except UserError:
        raise
    except Exception as e:  # hub unreachable, unknown split, bad file: one clear paragraph, not a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"Could not load dataset {path!r} (split {split!r}): {first} Set task.path or "
                        "task.sources.<split>.path to a local file with the same fields, or check the name and split.") from None


def _rows_to_samples(rows: Any, src: dict[str, Any], cfg: Any, tokenizer: Any, where: str) -> list[Sample]:
    """Rows -> Samples; rows without a question or a gold answer are skipped and counted (refused above
    task.max_bad_fraction, so a wrong answer_format cannot train on nothing)."""
    missing = [f for f in (src["question_field"], src["answer_field"]) if f not in rows.column_names]
    if missing:
        raise UserError(f"{where} has no field(s) {missing}; it has {rows.column_names}. Set task.question_field and "
                        "task.answer_field (or task.sources.<split>.question_field / answer_field) to the right names.")
    out, bad = [], []
    for i, row in enumerate(rows):
        q, a = row[src["question_field"]], row[src["answer_field"]]
        gold = gold_from(str(a), src["answer_format"]) if a is not None else ""
        if q is None or not str(q).strip() or not gold:
            bad.append(i)
            continue
        trace = row.get(src["trace_field"]) if src.get("trace_field") else None
        meta = {"row": i, **({"trace": str(trace)} if trace else {})}
        out.append(Sample(prompt=format_prompt(re.sub(r"\s+$", "", str(q)), cfg, tokenizer), gold=gold, meta=meta))
    if bad and len(bad) > cfg.get("max_bad_fraction", 0.01) * max(len(rows), 1):
        raise UserError(f"{where}: {len(bad)} of {len(rows)} rows have no question or no gold answer in the "
                        f"{src['answer_format']!r} format (rows {bad[:8]}{' ...' if len(bad) > 8 else ''}). Check "
                        "task.answer_format (gsm8k needs '#### <answer>', boxed needs \\boxed{...}) and the field names.")
    if bad:
        note(f"{where}: skipped {len(bad)} row(s) without a question or gold answer (rows {bad[:8]}).")
    return out


def question_hash(text: str) -> str:
    return hashlib.sha256(text.strip().encode()).hexdigest()


def _source_samples(cfg: Any, split: str, tokenizer: Any) -> list[Sample]:
    src = source_of(cfg, split)
    rows = load_rows(str(src["path"]), src["config_name"], str(src["split"] or split))
    return _rows_to_samples(rows, src, cfg, tokenizer, f"task.sources.{split} ({src['path']}, split {src['split']})")


def _carve_dev(train: list[Sample], dev_size: int) -> tuple[list[Sample], list[Sample]]:
    """(train without dev, dev): dev = the dev_size prompts whose hash is lowest, so it is the same for
    every run and every row order; duplicates of a dev prompt leave training too."""
    keys = [question_hash(s.prompt) for s in train]
    ranked = sorted(set(keys))
    if dev_size > len(ranked) // 2:
        raise UserError(f"task.dev_size={dev_size} would take {min(dev_size, len(ranked))} of the {len(ranked)} distinct "
                        f"training prompts for the dev split. Lower it (e.g. task.dev_size={max(len(ranked) // 10, 1)}) "
                        "or give dev its own data (task.sources.dev.path=FILE).")
    dev_keys = set(ranked[:dev_size])
    first = {}  # hash -> the first sample with it (a duplicated dev prompt is evaluated once)
    for h, s in zip(keys, train):
        first.setdefault(h, s)
    return [s for h, s in zip(keys, train) if h not in dev_keys], [first[h] for h in ranked[:dev_size]]


@register("task", "hf")
def hf_task(cfg: Any, split: str, tokenizer: Any) -> list[Sample]:
    """Rows of the split's source; dev without its own source is carved out of the training rows."""
    if source_of(cfg, split) is None and split != "dev":
        raise UserError(f"task.sources.{split} is not set, so this task has no {split} split. Give it one "
                        f"(task.sources.{split}.path=FILE or task.sources.{split}.split=NAME), or choose another eval.split.")
    if split == "dev" and source_of(cfg, "dev") is None:
        samples = _carve_dev(_source_samples(cfg, "train", tokenizer), cfg.dev_size)[1]
    elif split == "train" and source_of(cfg, "dev") is None:
        samples = _carve_dev(_source_samples(cfg, "train", tokenizer), cfg.dev_size)[0]
    else:
        samples = _source_samples(cfg, split, tokenizer)
    limit = cfg.train_size if split == "train" else cfg.eval_size
    return samples[:limit] if limit else samples


def check_disjoint(train: list[Sample], held_out: dict[str, list[Sample]]) -> list[Sample]:
    """Refuse held-out splits that share prompts with training (they would measure memorised rows);
    a stray duplicate or two (<= 1% of the split, as real hub datasets have) leaves training instead.
    Returns the training set to use."""
    train_keys = {question_hash(s.prompt) for s in train}
    dropped: set[str] = set()
    for split, samples in held_out.items():
        shared = {question_hash(s.prompt) for s in samples} & train_keys
        if not shared:
            continue
        if len(shared) > max(0.01 * len(samples), 1):
            example = next(s.prompt for s in samples if question_hash(s.prompt) in shared)
            raise UserError(f"The {split!r} split shares {len(shared)} of its {len(samples)} prompts with the training "
                            f"rows (e.g. {example.strip()[:80]!r}), so its numbers would measure memorised rows. Give "
                            f"{split} its own data (task.sources.{split}.path=FILE or a hub split), or evaluate on dev, "
                            "which is carved out of the training rows (eval.split=dev).")
        dropped |= shared
    if dropped:
        note(f"{len(dropped)} training prompt(s) also appear in a held-out split; they were left out of training.")
    return [s for s in train if question_hash(s.prompt) not in dropped] if dropped else train
