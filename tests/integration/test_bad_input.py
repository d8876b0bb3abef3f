"""Bad input through the CLI: every case ends in exit status 2 with one paragraph that names the problem
and the fix, never a traceback, and leaves no run directory behind.

Each row is what a user typed; `needle` is what the message must say. Rows run in this process through
`rredcot.cli.main` (the real entry point, minus the interpreter start: ~0.3 s a row); a few run as real
processes at the end, to show the same holds for `python -m rredcot`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from .conftest import cli, run_main

# (command line after `rredcot`, what the error must say). {A} = the assets folder made below.
CONFIG = [
    ("train update.micro_batch_size=0", "update.micro_batch_size=0 is out of range: it must be an integer >= 1"),
    ("train train.generation_batch_size=0", "train.generation_batch_size=0 is out of range"),
    ("train rollout.top_k=-5", "rollout.top_k=-5 is out of range: it must be an integer >= 0"),
    ("train optim.schedule=linear", "it must be one of constant, cosine"),
    ("train optim.lr=-1", "optim.lr=-1 is out of range: it must be a number > 0"),
    ("train train.log_every=0", "train.log_every=0 is out of range"),
    ("train task.ops=''", "task.ops='' is out of range"),
    ("train task.ops=+", "'-' and at least one of"),
    ("train task.steps=30", "task.steps=30 is out of range: it must be an integer from 1 to 25"),
    ("train task.steps=20 task.distractors=3", "need 27 variable names"),
    ("train task.max_value=0", "task.max_value=0 is out of range"),
    ("train eval.n_prompts=0", "eval.n_prompts=0 is out of range"),
    ("train rollout.chunk_size=0", "rollout.chunk_size=0 is out of range"),
    ("train task=gsm8k 'verify.options={{mode: bogus}}'", "the gsm8k verifier's mode is 'strict' or 'flexible'"),
    ("train 'verify.options={{mode: strict}}'", "do not fit the 'builtin' verifier"),
    ("train segment=fixed segment.size=0", "segment.size=0 is out of range"),
    ("train +segment.size=3", "segment.size is not an option of segment 'hybrid'"),
    ("train redistribute.mode=sideways", "it must be one of immediate, return_to_go, mixed, anchored"),
    ("train device=tpu", "it must be one of auto, cpu, cuda"),
    ("train seed=-1", "seed=-1 is out of range"),
    ("train eval.ks=[]", "eval.ks=[] is out of range"),
    ("train eval.ks=[1,8]", "asks for pass@8, but eval.n_samples=2"),
    ("train rollout.temperature=0", "rollout.temperature=0 is out of range: it must be a number > 0"),
    ("train rollout.max_new_tokens=0", "rollout.max_new_tokens=0 is out of range: it must be an integer >= 1"),
    ("train eval.temperature=0", "eval.temperature=0 is out of range"),
    ("train optim.warmup_ratio=2", "it must be a number in [0, 1]"),
    ("train model.dtype=int8", "one of float32, bfloat16, float16"),
    ("train update.max_grad_norm=0", "update.max_grad_norm=0 is out of range"),
    ("train train.steps=-3", "train.steps=-3 is out of range"),
    ("train rollout.group_size=1", "a group needs at least 2"),
    ("train train.generation_batch_size=10", "not a whole number of groups"),
    ("train rollout.temperture=0.5", "Did you mean rollout.temperature"),
    ("train rollout.temperature=hot", "has the wrong type"),
    ("train algo=grpoo", "algo"),
    ("train segment.name=fixd", "Did you mean 'fixed'"),
    ("train exp=nope", "exp"),
    ("train hydra.run.dir=x", "rredcot reads only hydra.searchpath"),
    ("train 'rollout.temperature=(('", "Could not parse the overrides"),
    ("train plugins=[no_such_plugin_module]", "could not be imported"),
    ("train resume=true", "resume=true needs run_dir=PATH"),
    ("train resume=true run_dir={A}/no_run_here", "holds no run (no config.yaml)"),
    ("train credit.estimators=[foo]", "Set credit.estimators to one of these"),
    ("credit credit.against=bogus", "credit.against='bogus': the only reference is mc"),
    ("compare --split validation --runs {A}/r1 {A}/r2", "the held-out splits are dev and test"),
    ("compare --runs {A}/no_run", "at least two run directories"),
    ("eval", "rredcot eval needs checkpoint=PATH"),
    ("eval checkpoint={A}/no_model", "neither a model directory"),
]
# Loading a model: the folders come from `assets` below.
MODEL = [
    ("train model.name={A}/missing warmstart.enabled=false", "there is no folder"),
    ("train model.name={A}/no_tokenizer warmstart.enabled=false", "has no tokenizer"),
    ("train model.name={A}/bert warmstart.enabled=false", "not a causal (decoder-only) language model"),
    ("train model.name={A}/no_config warmstart.enabled=false", "has no config.json"),
    ("train rollout.max_new_tokens=300 warmstart.enabled=false", "leaves no room for a prompt"),
    ("train warmstart.examples=10", "fewer than warmstart.batch_size"),
    (
        "train model.lora.r=4 model.lora.target_modules=[nope] warmstart.enabled=false",
        "This model's linear layers are named",
    ),
]
# Data files: task=gsm8k on local files, with the hub-shaped tiny model.
HF = "train task=gsm8k model.name={M} warmstart.enabled=false task.sources.test.path={A}/test.jsonl "
DATA = [
    (HF + "task.sources.train.path={A}/empty.jsonl", "it is empty"),
    (HF + "task.sources.train.path={A}/latin1.jsonl", "line 2 is not UTF-8 text"),
    (HF + "task.sources.train.path={A}/not_json.jsonl", "line 3 is not JSON"),
    (HF + "task.sources.train.path={A}/array.jsonl", "line 1 is a JSON list, not an object"),
    (HF + "task.sources.train.path={A}/missing.jsonl", "task.sources.train.path"),
    (HF + "task.sources.train.path={A}/no_hash.jsonl", "have no question or no gold answer in the 'gsm8k' format"),
    (HF + "task.sources.train.path={A}/nulls.jsonl", "rows [0, 2, 4"),
    (HF + "task.sources.train.path={A}/long.jsonl train.max_prompt_tokens=40", "prompts are longer than 40 tokens"),
    (
        HF + "task.sources.train.path={A}/test.jsonl task.dev_size=4 eval.n_prompts=16",
        "split shares 15 of its 16 prompts",
    ),
    (HF + "task.sources.train.path={A}/train.jsonl task.answer_format=boxed", "'boxed' format"),
    (
        HF + "task.sources.train.path={A}/train.jsonl task.answer_format=plain task.dev_size=20",
        "do not pass the verifier's own check",
    ),
    (HF + "task.sources.train.path={A}/train.jsonl task.question_field=prompt", "has no field(s) ['prompt']"),
    (HF + "task.sources.train.path={A}/train.jsonl +task.sources.valid.path=x", "the splits are train, dev and test"),
    (HF + "task.sources.train.path={A}/train.jsonl task.dev_size=400", "task.dev_size=400 would take"),
]


def _row(i: int, **kw) -> str:
    return (
        json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i} #### {2 * i}", **kw}) + "\n"
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory, hub_shaped_model) -> Path:
    """Broken models and data files, each broken in one way."""
    from transformers import BertConfig, BertModel

    from rredcot.task.model import load_tokenizer

    a = tmp_path_factory.mktemp("bad")
    tok = load_tokenizer("builtin")
    for name, drop in (("no_tokenizer", ("tokenizer",)), ("no_config", ("config.json",))):
        (a / name).mkdir()
        for f in hub_shaped_model.iterdir():
            if not f.name.startswith(drop):
                (a / name / f.name).write_bytes(f.read_bytes())
    BertModel(
        BertConfig(
            vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(a / "bert")
    tok.save_pretrained(a / "bert")
    (a / "train.jsonl").write_text("".join(_row(i) for i in range(300)))
    (a / "test.jsonl").write_text("".join(_row(i) for i in range(1000, 1040)))
    (a / "empty.jsonl").write_text("")
    (a / "latin1.jsonl").write_bytes(_row(1).encode() + _row(2).replace("plus", "pl\u00fcs").encode("latin-1"))
    (a / "not_json.jsonl").write_text(_row(1) + _row(2) + "question: 3 plus 3?\n")
    (a / "array.jsonl").write_text(json.dumps(["What is 1 plus 1?", "#### 2"]) + "\n")
    (a / "no_hash.jsonl").write_text(
        "".join(json.dumps({"question": f"{i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(300))
    )
    (a / "nulls.jsonl").write_text("".join(_row(i, question=None) if i % 2 == 0 else _row(i) for i in range(300)))
    (a / "long.jsonl").write_text("".join(_row(i, question=f"{'very ' * 20}long question {i}?") for i in range(300)))
    return a


def _check(line: str, needle: str, tmp_path: Path, **fmt) -> None:
    run = tmp_path / "run"
    if line.split()[0] == "train":
        line += " debug=fast logging.progress=false" + ("" if "resume=true" in line else f" run_dir={run}")
    code, err = run_main(line, **fmt)
    message = " ".join(err.split())
    assert code == 2, f"exit {code} for `{line}`:\n{err[-2000:]}"
    assert needle in message, f"`{line}` said:\n{message}"
    assert message.count("error:") == 1 and "Traceback" not in err
    assert not run.exists(), f"`{line}` left a run directory behind"


@pytest.mark.parametrize("line,needle", CONFIG, ids=[c[0] for c in CONFIG])
def test_config_and_command_line(line, needle, assets, tmp_path):
    _check(line, needle, tmp_path, A=assets)


@pytest.mark.parametrize("line,needle", MODEL, ids=[c[0].split()[1] for c in MODEL])
def test_model_loading(line, needle, assets, tmp_path):
    _check(line, needle, tmp_path, A=assets)


@pytest.mark.parametrize("line,needle", DATA, ids=[c[0].split()[-1].split("/")[-1] for c in DATA])
def test_data_files(line, needle, assets, hub_shaped_model, tmp_path):
    _check(line, needle, tmp_path, A=assets, M=hub_shaped_model)


def test_a_few_stray_rows_are_skipped_with_a_note_not_refused(assets, hub_shaped_model, tmp_path):
    """A 2 MB question (it once tried to allocate 2.8 TB) and a null answer among 300 good rows: skipped, named."""
    rows = (assets / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "few.jsonl").write_text(_row(7000, question="x" * 2_000_000) + _row(7001, answer=None) + "".join(rows))
    from rredcot.compose import load_config
    from rredcot.startup import prompt_limit, task_sets
    from rredcot.task.warmstart import load_policy

    cfg = load_config(
        shlex.split(
            (HF + "task.sources.train.path={T}/few.jsonl task.dev_size=20").format(
                A=assets, M=hub_shaped_model, T=tmp_path
            )
        )[1:]
    )
    model, tok = load_policy(cfg)
    train, held_out = task_sets(cfg, tok, prompt_limit(cfg, model))
    assert len(train) == 300 - 20 and all(len(s.prompt) < 1000 for s in train)


@pytest.mark.parametrize(
    "line,needle",
    [
        ("train +exp=gsm8k", "Is the hub reachable from here?"),  # the README's own command, offline
        ("train optim.schedule=linear", "it must be one of constant, cosine"),
        (HF + "task.sources.train.path={A}/latin1.jsonl", "line 2 is not UTF-8 text"),
    ],
)
def test_real_processes_exit_2_without_a_traceback(line, needle, assets, hub_shaped_model, tmp_path):
    run = tmp_path / "run"
    proc = cli(
        *shlex.split(line.format(A=assets, M=hub_shaped_model)),
        "debug=fast",
        f"run_dir={run}",
        check=False,
        env={"HF_HUB_OFFLINE": "1"},
        timeout=300,
        real=True,  # a fresh interpreter: the test is about real processes (and HF_HUB_OFFLINE is read at import)
    )
    assert proc.returncode == 2 and needle in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr
    assert not run.exists()
