"""The vllm extra against PyPI (scripts/compat/resolve_vllm.sh: pip's resolver, metadata only; marked slow,
~1-3 min a case, and skipped without network). What it found on 2026-12 is what these assert: every vLLM
of the range pins torch exactly (==2.11.0 or ==2.13.0), so beside today's torch 2.15 nothing resolves, and
beside today's transformers (>=5.20) the newest that does is vllm 0.30.0 on torch 2.13.0 (0.31.0 caps
transformers <5.18). A widened range or a new vLLM that changes the answer fails here: update the README."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from .conftest import REPO

pytestmark = pytest.mark.slow


def _resolve(*requirements: str) -> dict:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError as e:
        pytest.skip(f"PyPI is unreachable from here ({e}): the check needs the network")
    pip = Path(sys.executable).with_name("pip")
    proc = subprocess.run(
        ["sh", "scripts/compat/resolve_vllm.sh", *requirements],
        cwd=REPO,
        env=dict(os.environ, PIP=str(pip), PY=sys.executable),
        capture_output=True,
        text=True,
        timeout=900,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_vllm_extra_resolves_beside_todays_transformers():
    got = _resolve("transformers>=5.20")
    assert got["ok"], got
    assert Version("0.22.0") <= Version(got["vllm"]) <= Version("0.31.0")
    assert got["torch"].startswith("2.13.0") and Version(got["transformers"]) >= Version("5.20"), got


def test_no_vllm_of_the_range_resolves_beside_torch_2_15():
    got = _resolve("torch==2.15.0", "transformers>=5.20")
    assert not got["ok"]
    assert any("depends on torch==2.13.0" in c for c in got["conflict"]), got
