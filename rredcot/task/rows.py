"""Local data files and the rows read from them, checked before any row becomes a Sample: what is wrong with
a file (diagnose_file: empty, not UTF-8, not JSON, one line), a path named like a data file that is not a
regular one (not_a_file: a directory, a FIFO), and fields that hold no text (not_text: a list where the
gold answer belongs). Each names the fix; the hf task (task/hub.py) raises or notes them."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from rredcot.errors import UserError, brief
from rredcot.task.conversation import well_formed
from rredcot.ui import note

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def diagnose_file(local: Path) -> str | None:
    """What is wrong with a local data file, in one sentence naming the line (None if nothing is found)."""
    if local.stat().st_size == 0:
        return "it is empty"
    if local.suffix not in (".jsonl", ".json", ".csv"):
        return None
    with local.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (
                    f"line {n} is not UTF-8 text (byte {e.start}: {raw[max(e.start - 12, 0) : e.start + 12]!r}); "
                    "re-save "
                    "the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)"
                )
            if local.suffix == ".jsonl" and line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return (
                        f"line {n} is not JSON ({e.msg}, column {e.colno}: {line.strip()[:60]!r}); "
                        "a .jsonl file has one JSON object per line"
                    )
                if not isinstance(row, dict):
                    kind = type(row).__name__
                    return f'line {n} is a JSON {kind}, not an object of fields ({{"question": ..., "answer": ...}})'
    return None


def load_error(path: str, split: str, e: Exception) -> UserError:
    local = Path(path).expanduser()
    why = diagnose_file(local) if local.is_file() else None
    if why is None:
        causes = [c for c in (e, e.__cause__, e.__context__) if c is not None and str(c).strip()]
        why = " ".join(str(causes[-1] if causes else e).split())[:300] or type(e).__name__
    return UserError(
        f"Could not load dataset {path!r} (split {split!r}): {why}. Set task.path or task.sources.<split>.path "
        "to a local file with the same fields, or check the name and split."
    )


def not_a_file(local: Path) -> str:
    """Why a path named like a data file is not one, and the fix."""
    kind = _KINDS.get(stat.S_IFMT(local.stat().st_mode)) if local.exists() else None
    if kind is None:
        return "there is no such file. Set it to an existing jsonl/json/parquet/csv file, or to a hub dataset name."
    if kind == "a directory":
        inside = sorted(p.name for p in local.iterdir() if p.suffix in DATA_SUFFIXES)[:4]
        return "it is a directory, not a data file. Set it to a jsonl/json/parquet/csv file" + (
            f" inside it ({', '.join(inside)})." if inside else " (this one holds none)."
        )
    return (
        f"it is {kind}, not a regular file: the rows are read more than once (checked, then loaded), which "
        f"{kind} cannot give. Write them to a file first (cat {local} > rows{local.suffix}) and set it to that."
    )


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def not_text(rows: Any, src: dict[str, Any], where: str, max_bad: float) -> set[int]:
    """Rows whose question, gold answer or trace is a list, a mapping or a bool (str() of it would be a prompt
    or a gold no verifier reads): refused above max_bad of the rows, else skipped with a note. A number is
    fine where an answer belongs (a 'plain' gold such as 42)."""
    fields = [(src["question_field"], (str,)), (src["answer_field"], (str, int, float))]
    fields += [(src["trace_field"], (str,))] if src.get("trace_field") else []
    odd: dict[int, tuple[str, Any]] = {}
    for i, row in enumerate(rows):
        for name, kinds in fields:
            v = row.get(name)
            if name == src["question_field"] and well_formed(v):  # a conversation (TRL's chat messages)
                continue
            if v is not None and (not isinstance(v, kinds) or isinstance(v, bool)):
                odd.setdefault(i, (name, v))
    if not odd:
        return set()
    i, (name, v) = next(iter(odd.items()))
    kind = {list: "list", dict: "mapping", bool: "true/false"}.get(type(v), type(v).__name__)
    if len(odd) > max_bad * max(len(rows), 1):
        key = {src.get("trace_field"): "trace_field", src["answer_field"]: "answer_field"}
        key[src["question_field"]] = "question_field"
        raise UserError(
            f"{where}: field {name!r} holds a {kind}, not text, in {len(odd)} of {len(rows)} rows (row {i}: "
            f"{brief(v, 60)}). A question, a gold answer and a trace are strings (a gold answer may be a number; "
            'a question may be a list of chat messages, [{"role": "user", "content": "..."}]). '
            f"Point task.{key[name]} at the field that holds the text, or write the rows with that field as "
            "text (e.g. the list's first element)."
        )
    note(f"{where}: skipped {len(odd)} row(s) whose {name!r} is a {kind}, not text (rows {sorted(odd)[:8]}).")
    return set(odd)


def check_samples(task: str, split: str, samples: Any) -> list:
    """A task entry (a plug-in's too) returns a list of Sample(prompt: str, gold: str, meta: dict). Anything else
    would crash far from its cause (a dict has no .prompt) or be blamed on the verifier (an int gold)."""
    from rredcot.types import Sample

    where = f"The task {task!r} returned"
    if not isinstance(samples, (list, tuple)):
        raise UserError(f"{where} a {type(samples).__name__} for the {split} split, not a list of Samples. {_SAMPLE}")
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise UserError(f"{where} a {type(s).__name__} as row {i} of its {split} split ({brief(s, 60)}). {_SAMPLE}")
        for name, want in (("prompt", str), ("gold", str), ("meta", dict)):
            v = getattr(s, name)
            if not isinstance(v, want):
                raise UserError(
                    f"{where} a Sample whose {name} is a {type(v).__name__} ({brief(v, 60)}) as row {i} of its "
                    f"{split} split. {_SAMPLE}"
                )
    return list(samples)


_SAMPLE = (
    "A task returns a list of rredcot.types.Sample(prompt=str, gold=str, meta=dict): the gold as text "
    "(str(82), not 82), which the verifier reads."
)
