"""One RL step run and checked in-process: Trainer.setup, then Trainer.step and Trainer.after_step."""

from __future__ import annotations

import json

import pytest
import torch

from rredcot.compose import load_config
from rredcot.trainer import StepRecord, Trainer
from rredcot.ui import make_progress


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "step"
    cfg = load_config(["debug=fast", f"run_dir={run}", "logging.progress=false"])
    trainer = Trainer(cfg, ["debug=fast"])
    with make_progress(False) as progress:
        trainer.setup(progress)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        record = trainer.step(1)
        stop = trainer.after_step(record)
    return trainer, record, before, stop, run


def test_a_step_is_five_timed_stages_and_one_record(one_step):
    trainer, record, _, _, _ = one_step
    assert isinstance(record, StepRecord) and record.step == 1
    assert list(record.times) == ["rollout", "verify", "segment", "redistribute", "update"]
    n = trainer.cfg.train.generation_batch_size  # 16 completions: 4 prompts x group_size 4
    assert record.rollout.completion_ids.shape[0] == n and record.verified.rewards.shape == (n,)
    assert len(record.segmented.boundaries) == n
    assert record.credit.advantages.shape == record.rollout.completion_ids.shape
    assert "loss" in record.update and "grad_norm" in record.update


def test_the_step_changes_the_weights_and_after_step_logs_it(one_step):
    trainer, record, before, stop, run = one_step
    after = list(trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before)) or record.update["grad_norm"] == 0
    assert stop is False
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and rows[-1]["time/step_s"] == pytest.approx(sum(record.times.values()))
    assert (run / "samples" / "step_000001.jsonl").exists()  # step 1 always writes samples
