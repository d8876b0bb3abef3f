"""pyproject.toml's lower bounds are the releases `make test-compat` installs and tests (scripts/compat/floors.txt):
a floor raised or lowered in one file and not the other fails here. A floor of pyproject.toml that the compat
venv does not install is listed below with the reason, so the untested ones stay in sight."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
REPO = Path(__file__).resolve().parents[2]
FLOORS = REPO / "scripts" / "compat" / "floors.txt"
# pyproject floors that floors.txt does not pin, and why (checked against the compat venv, 2026-12)
NOT_PINNED = {
    "torch": "the compat venv has the CPU 2.13.0 on this machine's disk; no CPU wheel of the floor 2.4 is here",
    "tokenizers": "transformers 4.56.0 itself requires tokenizers>=0.22.0,<=0.23.0: pip picks 0.22.2",
    "safetensors": "transformers 4.56.0 requires >=0.4.3; pip picks the newest (0.8.0)",
    "matplotlib": "plots only (rredcot compare); pip picks the newest (3.11.2)",
    "pyyaml": "pip picks the newest (6.0.4)",
}
# extras and tools with floors that are not part of the compat matrix
NOT_IN_MATRIX = {"vllm", "deepspeed", "pytest", "pytest-xdist", "hypothesis", "ruff"}


def _requirements() -> list[Requirement]:
    """Every requirement of pyproject.toml's [project] dependencies and optional dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(s) for s in project["dependencies"] + sum(project["optional-dependencies"].values(), [])]


def _floor(req: Requirement) -> Version | None:
    lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return max(lows) if lows else None


def _pinned() -> dict[str, Version]:
    out = {}
    for line in FLOORS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[name] = Version(version)
    return out


def test_every_floor_in_floors_txt_is_the_pyproject_floor():
    reqs = _requirements()
    wrong = []
    for name, version in _pinned().items():
        found = [r for r in reqs if r.name == name]
        if not found:
            wrong.append(f"{name}: in floors.txt, not in pyproject.toml")
        wrong += [f"{name}: floors.txt {version}, pyproject.toml {r}" for r in found if _floor(r) != version]
    assert not wrong, "\n".join(wrong)


def test_every_pyproject_floor_is_tested_or_says_why_not():
    pinned = _pinned()
    untested = sorted(
        {r.name for r in _requirements() if _floor(r) is not None} - set(pinned) - set(NOT_PINNED) - NOT_IN_MATRIX
    )
    assert not untested, f"add these floors to scripts/compat/floors.txt (or to NOT_PINNED, with why): {untested}"
    assert not set(NOT_PINNED) & set(pinned), "a floor is both pinned and listed as not pinned"


def test_the_requirement_parser_sees_the_known_lines():
    names = {r.name for r in _requirements()}
    assert {"torch", "transformers", "accelerate", "peft", "vllm", "deepspeed", "hydra-core", "math-verify"} <= names
