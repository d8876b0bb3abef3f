"""Test tiers: unit/ (hand-sized tensors, string tables, properties), config/ (everything composes),
integration/ (real CPU runs through the CLI). `slow` and `gpu` tests are skipped by default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --runslow"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device"))


@pytest.fixture(scope="session", autouse=True)
def warmstart_cache(tmp_path_factory):
    """One warm-start cache for the whole session, shared by the xdist workers (their base temp's parent is
    common; the cache's own lock lets one worker train an entry while the other waits), so each warm start
    of the suite is trained once."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "rredcot_cache"
    path.mkdir(exist_ok=True)
    os.environ["RREDCOT_CACHE"] = str(path)
    return path


@pytest.fixture
def tiny_model():
    """A random 2-layer built-in Llama and its tokenizer (no warm start)."""
    from omegaconf import OmegaConf

    from rredcot.task.model import build_tiny, load_tokenizer

    tok = load_tokenizer("builtin")
    cfg = OmegaConf.create(
        {"arch": "llama", "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "max_positions": 128}
    )
    return build_tiny(cfg, len(tok), seed=0).eval(), tok


@pytest.fixture
def fake_vllm(monkeypatch):
    """rollout=vllm with tests/fake_vllm.py as the vllm module and no CUDA check (see that file)."""
    from rredcot.stages import vllm_backend
    from tests import fake_vllm as fake

    monkeypatch.setattr(vllm_backend, "_import_vllm", lambda: fake.module)
    monkeypatch.setattr(vllm_backend, "_require_cuda", lambda: None)
    monkeypatch.setattr(fake.LLM, "instances", [])
    monkeypatch.setattr(fake.LLM, "dtype_override", None)
    return fake
