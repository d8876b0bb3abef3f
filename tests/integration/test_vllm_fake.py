"""rollout=vllm end to end through the CLI entry point, with tests/fake_vllm.py as the engine (CPU):
the run trains, re-scores the engine's tokens, logs the sampler mismatch, pushes the weights after every
step and leaves the same run directory as rollout=sample. Without vLLM the choice is refused (exit 2)."""

from __future__ import annotations

import json

from .conftest import run_main


def test_a_vllm_run_trains_logs_the_mismatch_and_syncs_every_step(fake_vllm, tmp_path):
    run = tmp_path / "run"
    code, err = run_main(f"train debug=fast rollout=vllm train.steps=2 run_dir={run} logging.progress=false")
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # an fp32 engine on the trainer's weights: the sampler and the trainer agree to float noise every step
    assert all(r["sampler/logp_diff_max"] < 1e-3 and abs(r["sampler/is_ratio_mean"] - 1) < 1e-3 for r in steps)
    engine = fake_vllm.LLM.instances[0]
    assert engine.calls.count("load_weights") == 3  # the start, then after each of the 2 steps
    assert engine.calls.count("sleep1") >= 2  # asleep through every update
    assert (run / "eval.json").exists() and (run / "config.yaml").read_text().count("name: vllm") == 1


def test_without_vllm_rollout_vllm_is_refused_with_the_install_command(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)
    code, err = run_main(f"train debug=fast rollout=vllm run_dir={tmp_path / 'run'} logging.progress=false")
    assert code == 2 and "pip install 'rredcot[vllm]'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
