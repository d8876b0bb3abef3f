"""The single-GPU path on CUDA (marker `gpu`: skipped where torch sees no CUDA device). Tiny random models of
the real architectures and chat templates (no hub needed: GPU machines here reach nothing outside), through
the CLI as a user runs them: bf16 weights, autocast, activation checkpointing, LoRA, and rollout=vllm when
vLLM is installed. Run them with `pytest -m gpu` on a machine with a GPU."""

from __future__ import annotations

import json

import pytest

from .conftest import cli
from .test_model_presets import GSM8K, _model_dir

pytestmark = pytest.mark.gpu
PRESET = "qwen2.5-1.5b-instruct"  # model.dtype: bfloat16, ChatML template


def _train(tmp_path, *extra: str):
    model_dir, run = _model_dir(tmp_path, PRESET), tmp_path / "run"
    proc = cli(
        "train",
        "debug=fast",
        "task=gsm8k",
        f"model={PRESET}",
        f"model.name={model_dir}",
        "warmstart.enabled=false",
        "device=cuda",
        *GSM8K,
        "rollout.max_new_tokens=32",
        f"run_dir={run}",
        "logging.progress=false",
        *extra,
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, [r for r in rows if "reward/mean" in r], proc


def test_bf16_training_and_eval_on_cuda(tmp_path):
    run, steps, _ = _train(tmp_path)
    assert len(steps) == 4 and all(r["memory/peak_mb"] > 0 for r in steps)
    assert all(r["grad_norm"] == r["grad_norm"] for r in steps)  # finite (NaN != NaN)
    cli("eval", f"checkpoint={run}", "device=cuda", "logging.progress=false")
    assert list((run / "evals").glob("*.json"))


def test_lora_autocast_and_checkpointing_on_cuda(tmp_path):
    pytest.importorskip("peft")
    run, steps, _ = _train(
        tmp_path, "model.lora.r=8", "update.autocast=bfloat16", "update.gradient_checkpointing=true", "update.beta=0.04"
    )
    assert len(steps) == 4 and all("kl" in r for r in steps)
    assert (run / "checkpoints").exists()


def test_vllm_rollout_on_cuda(tmp_path):
    pytest.importorskip("vllm")
    run, steps, _ = _train(tmp_path, "rollout=vllm", "rollout.gpu_memory_utilization=0.3", "rollout.enforce_eager=true")
    # a bf16 engine and a bf16 trainer on the same weights: close, not equal (kernels differ)
    assert all(r["sampler/logp_diff_mean"] < 0.5 and 0.5 < r["sampler/is_ratio_mean"] < 2 for r in steps)
    assert json.loads((run / "eval.json").read_text())["final"]["n_prompts"] > 0
