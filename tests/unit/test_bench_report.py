"""The README's performance table is the one benchmarks/report.py writes from benchmarks/results.json (a rerun
of `make bench` that changes a figure must change the README too), and results.json holds the headline keys."""

import json
from pathlib import Path

from benchmarks.__main__ import HEADLINE
from benchmarks.report import RESULTS, table

ROOT = Path(__file__).resolve().parents[2]


def test_results_json_holds_every_headline_key_and_the_machine():
    r = json.loads(RESULTS.read_text())
    assert set(HEADLINE) <= set(r) and r["machine"]["cpu_count"] >= 1
    assert not r["quick"]  # the committed figures are the full sizes', not a smoke test's


def test_the_readme_shows_the_table_written_from_results_json():
    assert table(json.loads(RESULTS.read_text())) in (ROOT / "README.md").read_text()


def test_a_missing_benchmark_reads_not_run():
    # a partial results.json (one benchmark failed) still renders, saying what did not run
    text = table({"step_overhead_ratio": 1.5, "redistribute_share": 0.2})
    assert "| 1.50x |" in text and "| 20.0% |" in text and text.count("not run") >= 4
