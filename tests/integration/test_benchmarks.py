"""Every benchmark of `make bench` runs at its --quick size and reports the keys results.json is built from
(the full sizes run in `make bench`, not here: they are timings, not tests)."""

import json
import math

import pytest

from benchmarks.__main__ import HEADLINE


def _finite(v) -> bool:
    if isinstance(v, dict):
        return bool(v) and all(_finite(x) for x in v.values())
    return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.mark.parametrize("name", sorted({bench for bench, _ in HEADLINE.values()}))
def test_each_benchmark_runs_at_its_quick_size_and_reports_its_headline_keys(name, tmp_path, monkeypatch):
    import importlib

    report = importlib.import_module(f"benchmarks.{name}").run(quick=True)
    keys = [inner for bench, inner in HEADLINE.values() if bench == name]
    assert report.rows and all(k in report.results for k in keys)
    assert all(_finite(report.results[k]) for k in keys if name != "memory")  # memory: a "before" may not run
    json.dumps(report.results)  # results.json must be able to hold it
