"""Registries: names per stage, clear errors for unknown names, duplicates refused."""
import pytest

from rredcot import registry
from rredcot.errors import UserError


def test_every_stage_has_its_entries():
    assert registry.names("segment") == ["entropy", "fixed", "hybrid", "keyword", "newline", "none"]
    assert registry.names("redistribute") == ["attention", "gradient", "mc", "rredcot", "uniform"]
    assert registry.names("update") == ["bnpo", "dapo", "dr_grpo", "grpo"]
    assert {"builtin", "gsm8k", "math", "format"} <= set(registry.names("verify"))
    assert registry.names("task") == ["builtin", "hf"]


def test_unknown_name_lists_the_valid_ones_and_the_closest():
    with pytest.raises(UserError) as e:
        registry.get("segment", "fixd")
    msg = str(e.value)
    assert "Did you mean 'fixed'" in msg and "fixed, hybrid" in msg and "segment.name" in msg


def test_duplicate_registration_raises():
    with pytest.raises(KeyError, match="registered twice"):
        registry.register("segment", "fixed")(lambda t: [0])


def test_unknown_stage():
    with pytest.raises(UserError, match="Stages are"):
        registry.names("nope")
