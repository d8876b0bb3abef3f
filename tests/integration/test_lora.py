"""LoRA through peft: only the adapter trains, the KL reference is the same network with the adapter
off, a checkpoint is a plain transformers model (merged) plus the adapter, and a resumed LoRA run is the
run that never stopped."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from .conftest import cli

pytest.importorskip("peft")
LORA = ["model.lora.r=4", "update.beta=0.05"]  # beta > 0: the reference is the policy with its adapter off


def _steps(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "reward/mean" in line]


def test_lora_trains_the_adapter_only_and_checkpoints_load_as_plain_models(tmp_path):
    run = tmp_path / "lora"
    cli("train", "debug=fast", *LORA, "train.steps=2", f"run_dir={run}", "logging.progress=false")
    ckpt = run / "checkpoints" / "step_000002"
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)  # the adapter alone ...
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # ... and it trained
    merged = AutoModelForCausalLM.from_pretrained(ckpt)  # plain transformers, no peft needed
    assert not any("lora" in k for k in merged.state_dict())
    # ... and the adapter opens with peft on its base model and merges to the same plain model on request
    from peft import PeftModel

    base_path = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    remerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path), ckpt / "adapter"
    ).merge_and_unload()
    for k, v in merged.state_dict().items():
        assert torch.allclose(remerged.state_dict()[k], v, atol=1e-6), k
    rows = _steps(run)
    assert all(r["kl"] >= 0 for r in rows) and rows[-1]["kl"] > 0  # policy moved away from its base


def test_a_resumed_lora_run_is_the_run_that_never_stopped(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    cli(
        "train",
        "debug=fast",
        *LORA,
        "train.steps=3",
        f"run_dir={whole}",
        "train.save_every=1",
        "logging.progress=false",
    )
    cli(
        "train",
        "debug=fast",
        *LORA,
        "train.steps=2",
        f"run_dir={split}",
        "train.save_every=1",
        "logging.progress=false",
    )
    cli("train", "resume=true", f"run_dir={split}", "train.steps=3", "logging.progress=false")
    a, b = _steps(whole), _steps(split)
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("reward/mean", "loss", "grad_norm", "kl"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4, abs=1e-6), key
    wa = load_file(whole / "checkpoints" / "step_000003" / "model.safetensors")
    wb = load_file(split / "checkpoints" / "step_000003" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
