"""Real CPU runs of `rredcot train` / `rredcot eval` through the CLI, on the tiny built-in setup."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rredcot.compose import load_config
from rredcot.task.model import load_tokenizer
from rredcot.task.warmstart import cache_key, warmstart_samples

from .conftest import ASSETS_DIR, cli, run_main


def test_run_directory_has_everything_a_user_opens(fast_run):
    assert (fast_run / "config.yaml").exists()
    rows = [json.loads(line) for line in (fast_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in (
        "reward/mean",
        "accuracy",
        "time/step_s",
        "frac_reward_zero_std",
        "entropy",
        "lr",
        "grad_norm",
        "completion/mean_length",
        "clip_ratio/region_mean",
        "tokens/s",
    ):
        assert key in steps[0], key
    assert any("eval/accuracy" in r for r in rows if r["step"] == 0)  # before RL
    assert sum("eval/accuracy" in r for r in rows if r["step"] > 0) >= 2  # periodic + final
    samples = sorted((fast_run / "samples").glob("*.jsonl"))
    assert samples and {"prompt", "completion", "reward", "segments"} <= set(
        json.loads(samples[0].read_text().splitlines()[0])
    )
    result = json.loads((fast_run / "eval.json").read_text())
    assert {"accuracy", "pass@1", "pass@2"} <= set(result["final"]) and result["start"] is not None


def test_checkpoint_loads_with_plain_transformers(fast_run):
    ckpt = fast_run / "checkpoints" / "step_000004"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "trainer_state.pt").exists()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("a=1, b=a+2. b=?\n", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == len(tok)


def test_every_trainable_parameter_changed(fast_run):
    cfg = load_config(["debug=fast"])
    from pathlib import Path

    key = cache_key(cfg, warmstart_samples(cfg, load_tokenizer("builtin")))
    start = load_file(Path(cfg.cache_dir).expanduser() / "warmstart" / key / "model.safetensors")
    end = load_file(fast_run / "checkpoints" / "step_000004" / "model.safetensors")
    assert start.keys() == end.keys()
    unchanged = [k for k in start if torch.equal(start[k], end[k])]
    assert not unchanged, f"parameters that RL did not change: {unchanged}"


def test_eval_command_writes_its_own_file_and_never_the_runs_eval_json(fast_run):
    before = (fast_run / "eval.json").read_text()
    proc = cli("eval", f"checkpoint={fast_run}", "eval.n_prompts=4")
    assert (fast_run / "eval.json").read_text() == before  # `rredcot eval` once overwrote it
    result = json.loads((fast_run / "evals" / "step_000004_test.json").read_text())
    for key in ("accuracy", "pass@1", "pass@2", "mean_length", "truncated_frac", "unclosed_think_frac"):
        assert 0 <= result[key] <= (1 if key != "mean_length" else 1e9)
    assert result["checkpoint"].endswith("step_000004") and result["n_prompts"] == 4 and "pass@1" in proc.stdout
    assert "eval.n_prompts: 256 -> 4" not in proc.stderr  # the run's own debug=fast size was 8
    assert "eval.n_prompts: 8 -> 4" in " ".join(proc.stderr.split())  # a changed setting is said
    cli("eval", f"checkpoint={fast_run}", "eval.n_prompts=4")
    assert (fast_run / "evals" / "step_000004_test-2.json").exists()  # a second evaluation gets its own file


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    run = tmp_path / "r"
    cli("train", "debug=fast", f"run_dir={run}", "train.steps=2", "logging.progress=false")
    proc = cli("train", "debug=fast", f"run_dir={run}", "train.steps=4", "resume=true", "logging.progress=false")
    steps = [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "reward/mean" in line
    ]
    assert steps == [1, 2, 3, 4], proc.stdout
    assert (run / "checkpoints" / "step_000004").exists()


def test_existing_run_is_never_overwritten(fast_run):
    before = (fast_run / "metrics.jsonl").read_text()
    proc = cli("train", "debug=fast", f"run_dir={fast_run}", check=False)
    assert proc.returncode == 2 and "resume=true" in proc.stderr and "Traceback" not in proc.stderr
    assert (fast_run / "metrics.jsonl").read_text() == before


def test_grpo_variants_train(tmp_path):
    """Reused batches (old log-probs recomputed), a KL reference model, another loss and a segmenter."""
    run = tmp_path / "v"
    cli(
        "train",
        "debug=fast",
        f"run_dir={run}",
        "train.steps=2",
        "update.num_iterations=2",
        "update.beta=0.1",
        "update.loss_type=grpo",
        "update.steps_per_generation=2",
        "segment=fixed",
        "redistribute.scale_rewards=batch",
        "update.mask_truncated_completions=true",
        "optim.schedule=cosine",
        "optim.warmup_steps=1",
        "model=qwen2_tiny",
        "logging.progress=false",
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "reward/mean" in line]
    assert "kl" in rows[0] and rows[0]["kl"] >= 0 and rows[0]["segments/per_trace"] >= 1


GSM8K_FILES = [
    f"task.sources.train.path={ASSETS_DIR / 'gsm8k_train.jsonl'}",
    f"task.sources.test.path={ASSETS_DIR / 'gsm8k_test.jsonl'}",
    "task.dev_size=4",
]


def test_local_gsm8k_files_with_a_hub_shaped_model(tmp_path, hub_shaped_model):
    """The hub-loading path on local files of the same shape: chat template, gsm8k gold, gsm8k verifier,
    train and test from their own files; then `eval` and `credit` read the run's own task."""
    run = tmp_path / "g"
    cli(
        "train",
        "debug=fast",
        "+exp=gsm8k",
        f"model.name={hub_shaped_model}",
        "model.dtype=float32",
        *GSM8K_FILES,
        "rollout.max_new_tokens=16",
        "train.steps=2",
        f"run_dir={run}",
        "logging.progress=false",
    )
    sample = json.loads(sorted((run / "samples").glob("*.jsonl"))[0].read_text().splitlines()[0])
    assert sample["prompt"].startswith("<|user|>") and sample["prompt"].endswith("<|assistant|>")
    train_golds = {
        line.rsplit("#### ", 1)[1].split('"')[0].replace(",", "")
        for line in (ASSETS_DIR / "gsm8k_train.jsonl").read_text().splitlines()
    }
    assert sample["gold"] in train_golds  # trained on the train file ...
    start = json.loads((run / "eval.json").read_text())["start"]
    assert {e["gold"] for e in start["examples"]} <= {"7", "30", "210", "20", "325", "9", "2100"}  # ... tested on test
    # `rredcot eval checkpoint=RUN` once scored a GSM8K checkpoint on the built-in task without a word
    cli("eval", f"checkpoint={run}", "eval.n_prompts=4")
    result = json.loads((run / "evals" / "step_000002_test.json").read_text())
    assert result["task"] == "hf" and result["verifier"] == "gsm8k"
    assert {e["gold"] for e in result["examples"]} <= {"7", "30", "210", "20", "325", "9", "2100"}
    proc = cli("eval", f"checkpoint={run}", "task=builtin", "model=builtin", check=False)
    assert "task.name: 'hf' -> 'builtin'" in " ".join(proc.stderr.split())  # a task change is said


def test_local_math_files(tmp_path, hub_shaped_model):
    run = tmp_path / "m"
    cli(
        "train",
        "debug=fast",
        "+exp=math500",
        f"model.name={hub_shaped_model}",
        "model.dtype=float32",
        f"task.sources.train.path={ASSETS_DIR / 'math_train.jsonl'}",
        f"task.sources.test.path={ASSETS_DIR / 'math500_test.jsonl'}",
        "task.dev_size=4",
        "rollout.max_new_tokens=8",
        "train.steps=1",
        f"run_dir={run}",
        "logging.progress=false",
    )
    assert json.loads((run / "eval.json").read_text())["final"]["n_prompts"] == 4


def test_one_file_for_train_and_test_is_refused_before_any_work(tmp_path, hub_shaped_model):
    run = tmp_path / "same"
    proc = cli(
        "train",
        "debug=fast",
        "+exp=gsm8k",
        f"model.name={hub_shaped_model}",
        "model.dtype=float32",
        f"task.path={ASSETS_DIR / 'gsm8k_train.jsonl'}",
        "task.dev_size=4",
        f"run_dir={run}",
        check=False,
    )
    assert proc.returncode == 2 and "shares" in proc.stderr and "Traceback" not in proc.stderr
    assert not run.exists()


def _step_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "reward/mean" in line]


def test_sigterm_saves_at_a_step_boundary_and_resume_matches_an_uninterrupted_run(fast_run, tmp_path):
    """SLURM sends SIGTERM at the time limit: the run finishes its step, saves, and the resumed run is
    the run that never stopped (same rewards and losses step by step, no duplicated metrics rows)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rredcot", "train", "debug=fast", f"run_dir={run}", "logging.progress=false"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and _step_rows(run)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "SIGTERM" in out and "Traceback" not in out, out
    saved = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(saved) == 1 and not saved[0].endswith(".tmp"), saved
    cli("train", "debug=fast", f"run_dir={run}", "resume=true", "logging.progress=false")
    got, want = _step_rows(run), _step_rows(fast_run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for key in ("reward/mean", "loss", "grad_norm"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-4, abs=1e-6), key
    assert json.loads((run / "eval.json").read_text())["start"] is not None


def test_resuming_a_finished_run_is_refused(fast_run):
    before = (fast_run / "metrics.jsonl").read_text()
    proc = cli("train", "debug=fast", f"run_dir={fast_run}", "resume=true", check=False)
    assert proc.returncode == 2 and "has finished" in proc.stderr
    assert (fast_run / "metrics.jsonl").read_text() == before


def test_nan_gradients_are_skipped_counted_and_stop_the_run(tmp_path):
    run = tmp_path / "nan"
    proc = cli("train", "debug=fast", "optim.lr=1e6", f"run_dir={run}", "logging.progress=false", check=False)
    assert proc.returncode == 2 and "non-finite gradients" in proc.stderr and "Traceback" not in proc.stderr
    rows = _step_rows(run)
    assert rows[-1]["skipped_nonfinite"] == 1.0
    for ckpt in (run / "checkpoints").iterdir():  # whatever was saved holds finite weights
        from safetensors.torch import load_file as load

        assert all(torch.isfinite(t).all() for t in load(ckpt / "model.safetensors").values())


def test_a_run_that_died_before_its_first_checkpoint_says_how_to_start_again(tmp_path):
    run = tmp_path / "dead"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    proc = cli("train", "debug=fast", f"run_dir={run}", check=False)
    assert proc.returncode == 2 and "before its first checkpoint" in proc.stderr and f"rm -r {run}" in proc.stderr


def test_resume_uses_the_runs_own_config(tmp_path):
    """A plain `resume=true run_dir=RUN` continues the run as it was configured (not the defaults);
    more steps are allowed and recorded; a change to what it trains is refused, naming the keys."""
    import yaml

    run = tmp_path / "own"
    cli(
        "train",
        "debug=fast",
        f"run_dir={run}",
        "train.steps=2",
        "seed=5",
        "rollout.temperature=0.9",
        "logging.progress=false",
    )
    code, err = run_main(f"train resume=true run_dir={run} seed=1 update.micro_batch_size=4")  # in-process: the refusal
    said = " ".join(err.split())
    assert code == 2 and "seed: 5 -> 1" in said and "update.micro_batch_size: 8 -> 4" in said
    proc = cli("train", "resume=true", f"run_dir={run}", "train.steps=3", "logging.progress=false")  # no debug=fast
    assert "train.steps: 2 -> 3" in " ".join(proc.stderr.split())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["seed"], cfg["rollout"]["temperature"], cfg["train"]["steps"], cfg["task"]["train_size"]) == (
        5,
        0.9,
        3,
        256,
    )
    assert "train.steps=3" in yaml.safe_load((run / "overrides.yaml").read_text())
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert len(resumes) == 1 and resumes[0]["from"] == "step_000002" and "train.steps=3" in resumes[0]["overrides"]
    assert [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "reward/mean" in line
    ] == [1, 2, 3]


DAPO = [  # dynamic sampling and overlong shaping, with TRL 1.16's GSPO ratio, two-sided clip and off-policy mask
    "debug=fast",
    "logging.progress=false",
    "train.steps=2",
    "train.save_every=1",
    "train.eval_every=0",
    "train.log_every=1",
    "train.samples_per_log=16",
    "train.dynamic_sampling=true",
    "train.max_extra_generation_batches=3",
    "verify.format_weight=0.5",  # groups that differ (the debug model answers nothing right)
    "verify.overlong_buffer=8",
    "verify.overlong_penalty=0.5",
    "update.num_iterations=2",  # ratios away from 1: the options below act
    "update.importance_sampling_level=sequence",
    "update.delta=1.5",
    "update.off_policy_mask_threshold=0.5",
]


def test_dynamic_sampling_counts_and_a_resume_is_the_run_that_never_stopped(tmp_path):
    """The counts add up (every generated group is trained on, dropped or surplus), the overlong penalty
    is in the rewards, and a run resumed from step 1 draws step 2's prompts and extra batches exactly as the
    uninterrupted run did (the prompt stream's state is in the checkpoint)."""
    import shutil

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    cli("train", *DAPO, f"run_dir={whole}")
    rows = _step_rows(whole)
    P = 16 // 4  # prompts per step (debug=fast)
    for r in rows:
        drawn = P * (1 + r["sampling/extra_batches"])
        assert drawn == P + r["sampling/dropped_groups"] + r["sampling/surplus_groups"], r
        assert r["reward/overlong/mean"] < 0 and r["frac_reward_zero_std"] == 0  # nothing was filled
    assert sum(r["sampling/dropped_groups"] for r in rows) > 0  # not vacuous: groups were dropped and redrawn

    shutil.copytree(whole, resumed)  # as if it had stopped after step 1's checkpoint
    shutil.rmtree(resumed / "checkpoints" / "step_000002")
    (resumed / "eval.json").unlink()
    cli("train", "resume=true", f"run_dir={resumed}", "logging.progress=false")
    step2 = "samples/step_000002.jsonl"
    assert (resumed / step2).read_text() == (whole / step2).read_text()
    got, want = _step_rows(resumed)[-1], rows[-1]
    for k, v in want.items():
        if not k.startswith(("time/", "tokens/s", "memory/")):
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    a, b = (load_file(str(r / "checkpoints" / "step_000002" / "model.safetensors")) for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
