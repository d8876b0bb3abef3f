"""Faults of the environment a run meets (issue 21, family 5), through the CLI: a seed numpy cannot take, a
deleted key, a model shape that does not divide, a plug-in verifier that returns a string, raises, NaN or
None, or kills its worker, a chat template that raises, a tokenizer without an EOS token, a data path that is
a directory or a FIFO, gold answers that are lists. Each ends in exit status 2 with one paragraph naming the
cause and a fix, no traceback, no run directory; where the message names a fix, a test applies it and shows
that the check then passes. Rows run in this process through `rredcot.cli.main` (tests/integration/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from .conftest import run_main

CONFIG = [
    ("train seed=4294967296", "seed=4294967296 is out of range: it must be an integer from 0 to 4294967295"),
    ("train warmstart.seed=4294967296", "warmstart.seed=4294967296 is out of range"),
    ("train seed=1000000000000000000000000000000", "seed=1e+30 is out of range"),
    ("train ~optim.lr", "~optim.lr deletes a key the code reads"),
    ("train ~train.steps", "Leave the override out to keep its default, or set it: train.steps=VALUE"),
    ("train ~verify.options", "empty it with 'verify.options={{}}'"),
    ("train ~task", "~task removes the task config, which every run needs. Choose another one with task=NAME"),
    ("train model.heads=3", "model.hidden_size=128 does not divide into model.heads=3 attention heads"),
    ("train model.hidden_size=12 model.heads=4", "gives each of model.heads=4 attention heads 3 dimensions, an odd"),
    ("train rollout.températur=0.5", "the key 'rollout.températur' has the non-ASCII character 'é'"),
    ("train task=gsm8k task.instruction=Réponds", "Quote the value: 'task.instruction=\"Réponds\"'"),
    ("train verify.timeout_s=1e9", "verify.timeout_s=1000000000.0 is out of range: it must be a number in [0, 86400]"),
    (
        "train rollout.max_new_tokens=1000000000000000000000000000000 warmstart.enabled=false",
        "rollout.max_new_tokens=1e+30 leaves no room for a prompt",
    ),
]
# Each of these names fixes; test_batch_fixes_... applies every one.
BATCH = [
    "train train.generation_batch_size=20 update.micro_batch_size=16",
    "train update.micro_batch_size=12",
    "train update.steps_per_generation=3",
    "train train.generation_batch_size=30",
]
HF = (
    "train task=gsm8k warmstart.enabled=false task.dev_size=20 task.sources.test.path={A}/test.jsonl "
    "task.sources.train.path={A}/{train} model.name={A}/{model}"
)
DATA = [
    ("raising", "train.jsonl", "fails on a one-message prompt (role user): TemplateError: System role not supported"),
    ("no_eos", "train.jsonl", "names no end-of-sequence (EOS) token (transformers made up '<|endoftext|>'"),
    ("short", "train.jsonl", "Set rollout.max_new_tokens="),
    ("chat", "adir.jsonl", "task.sources.train.path={A}/adir.jsonl: it is a directory, not a data file"),
    ("chat", "fifo.jsonl", "it is a named pipe (FIFO), not a regular file"),
    ("chat", "list_answers.jsonl", "field 'answer' holds a list, not text, in 300 of 300 rows (row 0: ['#### 0'])"),
    ("chat", "dict_answers.jsonl", "field 'answer' holds a mapping, not text"),
    ("chat", "list_questions.jsonl", "Point task.question_field at the field that holds the text"),
]
PLUG = "train warmstart.enabled=false plugins=[{P}/faulty.py] "
PLUGINS = [
    (PLUG + "verify.name=returns_str", "The verifier 'returns_str' returned '1.0' (a str) from __call__ for ''"),
    (PLUG + "verify.name=raises", "raised in __call__ on '': ValueError: boom (at {P}/faulty.py:"),
    (PLUG + "verify.name=raises verify.timeout_s=0", "raised in __call__ on '': ValueError: boom"),
    (PLUG + "verify.name=exits", "ended its worker process on 3 calls in a row: it exited with status 3"),
    (PLUG + "verify.name=returns_nan", "returned the reward nan from __call__"),
    (PLUG + "verify.name=returns_inf", "returned the reward inf from __call__"),
    (PLUG + "verify.name=none", "scores every completion tried at start-up as undefined"),
    (
        PLUG + "verify.name=none_judging_gold",
        "gold answers do not pass the verifier's own check for 200 of the first 200 rows",
    ),
    (PLUG + "verify.name=nan", "verify.name=nan is read as a number, not a name. Quote it: 'verify.name=\"nan\"'"),
    (PLUG + "'verify.name=\"nan\"'", "The verifier 'nan' returned the reward nan"),  # the quoting it names
    (PLUG + "task.name=int_gold", "The task 'int_gold' returned a Sample whose gold is a int"),
]
FAULTY = """
import math, os
from rredcot.registry import register
from rredcot.stages.verify import BuiltinVerifier
from rredcot.task.builtin import builtin_task
from rredcot.types import Sample, Score


class Plain(BuiltinVerifier):
    judges_gold = False


def _entry(name, base=Plain, **methods):
    register("verify", name)(type(name, (base,), methods))


def _raise(self, completion, sample):
    raise ValueError("boom")


_entry("returns_str", __call__=lambda self, c, s: "1.0")
_entry("raises", __call__=_raise)
_entry("exits", __call__=lambda self, c, s: os._exit(3))
_entry("returns_nan", judge=lambda self, a, s: math.nan)
_entry("nan", judge=lambda self, a, s: math.nan)  # a name the override grammar reads as a number unless quoted
_entry("returns_inf", judge=lambda self, a, s: math.inf)
_entry("none", judge=lambda self, a, s: None)
_entry("none_judging_gold", base=BuiltinVerifier, judge=lambda self, a, s: None)
# fine on what start-up tries (an empty completion, the gold), NaN on what a model writes
_entry("nan_on_real_text", __call__=lambda self, c, s: Score(0.0 if c in ("", s.gold) else math.nan, "x"))


@register("task", "int_gold")
def int_gold(cfg, split, tokenizer=None):
    return [Sample(s.prompt, int(s.gold), s.meta) for s in builtin_task(cfg, split, tokenizer)]
"""


def _row(i: int, **kw) -> str:
    return json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i} #### {2 * i}", **kw})


def _model_copy(src: Path, dst: Path, edit: str, change) -> Path:
    shutil.copytree(src, dst)
    path = dst / edit
    if edit.endswith(".json"):
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    else:
        path.write_text(change)
    return dst


@pytest.fixture(autouse=True)
def _registry_as_it_was():
    """The plug-ins these rows import in this process (run_main) register entries; later tests in the same
    worker (the registry's own tables) must see the registry as shipped."""
    from rredcot import registry

    saved = {stage: set(entries) for stage, entries in registry._REGISTRY.items()}
    loaded = set(registry._loaded_plugins)
    yield
    for stage, names in saved.items():  # built-in entries imported meanwhile stay (they register only once)
        entries = registry._REGISTRY[stage]
        for name in [n for n in entries if n not in names and n not in registry.BUILTIN.get(stage, {})]:
            del entries[name]
    registry._loaded_plugins.intersection_update(loaded)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, hub_shaped_model) -> Path:
    """The hub-shaped tiny model, broken one way per copy; data files; a plug-in of faulty entries."""
    a = tmp_path_factory.mktemp("env")
    shutil.copytree(hub_shaped_model, a / "chat")
    _model_copy(
        hub_shaped_model, a / "raising", "chat_template.jinja", "{{ raise_exception('System role not supported') }}"
    )
    _model_copy(
        hub_shaped_model,
        a / "no_eos",
        "tokenizer_config.json",
        lambda c: {k: v for k, v in c.items() if k != "eos_token"},
    )
    _model_copy(hub_shaped_model, a / "short", "config.json", lambda c: {**c, "max_position_embeddings": 128})
    (a / "train.jsonl").write_text("\n".join(_row(i) for i in range(300)) + "\n")
    (a / "test.jsonl").write_text("\n".join(_row(i) for i in range(1000, 1040)) + "\n")
    (a / "list_answers.jsonl").write_text("\n".join(_row(i, answer=[f"#### {2 * i}"]) for i in range(300)))
    (a / "dict_answers.jsonl").write_text("\n".join(_row(i, answer={"a": f"#### {2 * i}"}) for i in range(300)))
    (a / "list_questions.jsonl").write_text("\n".join(_row(i, question=[f"{i}+{i}?"]) for i in range(300)))
    (a / "adir.jsonl").mkdir()
    os.mkfifo(a / "fifo.jsonl")
    (a / "faulty.py").write_text(FAULTY)
    return a


def _check(line: str, needle: str, tmp_path: Path, **fmt) -> str:
    """`rredcot LINE` (a debug=fast train): exit 2, the needle, one paragraph, no traceback, no run directory."""
    run = tmp_path / "run"
    code, err = run_main(line + f" debug=fast logging.progress=false run_dir={run}", **fmt)
    message = " ".join(err.split())
    assert code == 2, f"exit {code} for `{line}`:\n{err[-2000:]}"
    assert needle.format(**fmt) in message, f"`{line}` said:\n{message}"
    assert message.count("error:") == 1 and "Traceback" not in err
    assert not re.search(r"\d{16}", message), f"a huge number is shown in full:\n{message}"
    assert not run.exists(), f"`{line}` left a run directory behind"
    return message


def _fixes(message: str) -> list[str]:
    """The batch settings a message names, e.g. 'train.generation_batch_size=12 with update.micro_batch_size=4'."""
    named = re.split(r"Set |micro-batches: ", message)[-1]  # after the values the message echoes
    return re.findall(r"((?:train|update)\.\w+=\d+(?: with (?:train|update)\.\w+=\d+)?)", named)


def _loads(line: str, **fmt):
    """The config, policy and data of `rredcot LINE` load: every start-up check up to the run directory passes."""
    from rredcot.compose import load_config
    from rredcot.startup import prompt_limit, task_sets
    from rredcot.task.warmstart import load_policy

    cfg = load_config(shlex.split(line.format(**fmt))[1:] + ["debug=fast"])
    model, tok = load_policy(cfg)
    return cfg, task_sets(cfg, tok, prompt_limit(cfg, model))


@pytest.mark.parametrize("line,needle", CONFIG, ids=[c[0][6:40] for c in CONFIG])
def test_config_faults(line, needle, tmp_path):
    _check(line, needle, tmp_path)


@pytest.mark.parametrize(
    "line, key, value",
    [
        ("train verify.timeout_s=0.5", "verify.timeout_s", 0.5),  # a float where the default is written 10
        ("train model.lora.alpha=16.5", "model.lora.alpha", 16.5),
        ("train seed=4294967295", "seed", 4294967295),  # the largest seed the message names
        ("train task=gsm8k 'task.instruction=\"Réponds\"'", "task.instruction", "Réponds"),  # the quoting it names
        ("train ~exp ~algo", "segment.name", "hybrid"),  # preset groups may be deleted
    ],
)
def test_what_the_messages_suggest_is_accepted(line, key, value):
    from omegaconf import OmegaConf

    from rredcot.compose import load_config

    assert OmegaConf.select(load_config(shlex.split(line)[1:] + ["debug=fast"]), key) == value
    if key == "seed":
        from accelerate.utils import set_seed

        set_seed(value)  # numpy, torch and random all take it


@pytest.mark.parametrize("line", BATCH)
def test_batch_fixes_named_in_the_message_pass(line, tmp_path):
    from rredcot.compose import load_config

    message = _check(line, "", tmp_path)
    fixes = _fixes(message)
    assert fixes, message
    for fix in fixes:
        load_config(shlex.split(line)[1:] + ["debug=fast", *fix.split(" with ")])


def test_world_size_fixes_named_in_the_message_pass(tmp_path, monkeypatch):
    from rredcot.checks import validate
    from rredcot.compose import load_config

    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun sets; the check runs before any process group
    message = _check("train", "3 processes share each step's 4 prompts", tmp_path)
    fixes = _fixes(message)
    assert "train.generation_batch_size=12 with update.micro_batch_size=4" in fixes
    for fix in fixes:
        load_config(["debug=fast", *fix.split(" with ")])
    worlds = re.search(r"launch a number of processes that fits this batch \(([\d, or]+)\)", message).group(1)
    monkeypatch.delenv("WORLD_SIZE")  # the world sizes are checked as named, not as launched
    for world in re.findall(r"\d+", worlds):
        validate(load_config(["debug=fast"], check_entries=False), check_entries=False, world_size=int(world))


@pytest.mark.parametrize("model,train,needle", DATA, ids=[f"{m}-{t}" for m, t, _ in DATA])
def test_model_and_data_faults(model, train, needle, assets, tmp_path):
    _check(HF, needle, tmp_path, A=assets, model=model, train=train)


def test_the_fixes_for_a_template_an_eos_and_a_short_context_pass(assets, tmp_path):
    base = dict(A=assets, train="train.jsonl")
    _loads(HF + " task.chat_template=false", model="raising", **base)  # plain-text prompts
    message = _check(HF, "", tmp_path, model="short", **base)
    new = re.search(r"rollout\.max_new_tokens=(\d+)", message).group(1)
    train, _ = _loads(HF + f" rollout.max_new_tokens={new}", model="short", **base)[1]
    assert len(train) == 256  # debug=fast's train_size: every prompt fits
    fixed = _model_copy(
        assets / "no_eos", tmp_path / "no_eos", "tokenizer_config.json", lambda c: {**c, "eos_token": "</s>"}
    )
    _loads(HF.replace("{A}/{model}", str(fixed)), model="", **base)


@pytest.mark.parametrize("line,needle", PLUGINS, ids=[p[0].split()[-1] for p in PLUGINS])
def test_plugin_faults(line, needle, assets, tmp_path):
    _check(line, needle, tmp_path, P=assets)


def test_a_nan_reward_at_run_time_is_refused_naming_the_verifier(assets, tmp_path):
    """The start-up try passes; the first completion the model writes scores NaN, which stops the run, exit 2."""
    run = tmp_path / "run"
    line = (PLUG + "verify.name=nan_on_real_text train.steps=1").format(P=assets)
    code, err = run_main(line + f" debug=fast logging.progress=false run_dir={run}")
    assert code == 2 and "The verifier 'nan_on_real_text' returned the reward nan from __call__" in err
    assert "Traceback" not in err
