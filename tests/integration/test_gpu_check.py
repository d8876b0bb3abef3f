"""scripts/gpu_check.sh --dry-run, as CI runs it: every part of the device check on CPU at toy sizes, and the
JSON file has every key the README's device figures are read from (the same keys as on the GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import REPO

PARTS = ("env", "train", "probes", "sampler", "gpu_tests")
STAGES = {"rollout_s", "verify_s", "segment_s", "redistribute_s", "update_s", "step_s"}


def test_the_gpu_check_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["status"] == "done"
    assert {p: report[p]["status"] for p in PARTS} == dict.fromkeys(PARTS, "ok")
    assert all(report[p]["seconds"] > 0 for p in PARTS)
    env_part = report["env"]
    assert {"torch", "torch_cuda_build", "cuda_available", "versions", "missing", "outside_pins"} <= set(env_part)
    if not env_part["cuda_available"]:  # CI: the CPU build says why there is no GPU
        assert "cuda_note" in env_part
    assert report["train"]["steps"] == 2 and report["train"]["model"]["arch"] == "qwen2"
    assert set(report["stages"]) == STAGES and report["stages"]["step_s"] > 0
    for length in ("4k", "16k", "32k"):
        probe = report["probes"][length]
        assert probe["finite"] and probe["seconds"] > 0 and probe["path"] in ("packed", "cached")
    assert report["probes"]["4k"]["path"] == "packed" and report["probes"]["32k"]["path"] == "cached"
    sampler = report["sampler"]
    assert sampler["rollout_sample_tokens_per_s"] > 0 and sampler["hf_generate_tokens_per_s"] > 0
    assert sampler["rollout_sample_tokens"] == sampler["hf_generate_tokens"] == sampler["rows"] * sampler["new_tokens"]
    assert report["gpu_tests"]["failed"] == 0 and report["gpu_tests"]["error"] == 0
    assert set(report["peak_memory_mb"]) == {"train", "probes", "sampler"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_tests.log", "train.log"]
