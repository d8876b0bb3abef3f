"""Plug-ins from outside the package: a task and a verifier in a user's own module and config directory,
through `train` (via `compare`, whose runs are child processes), `eval`, `list`, and an installed
package's entry point."""

import json
import shutil

import pytest

from .conftest import ASSETS_DIR, cli


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """The plug-in copied to a temporary directory, as a user's own project outside the package."""
    path = tmp_path_factory.mktemp("user_project")
    shutil.copytree(ASSETS_DIR / "plugin", path, dirs_exist_ok=True)
    return path


def _plugin_args(user_dir):
    return [f"plugins=[{user_dir / 'pairsum.py'}]", f"hydra.searchpath=[file://{user_dir / 'conf'}]", "task=pairsum"]


def test_a_plugin_task_trains_in_compare_children_and_evaluates(user_dir, tmp_path):
    out = tmp_path / "cmp"
    cli("compare", "--seeds", "1", "--out", str(out), *_plugin_args(user_dir), "debug=fast", "train.steps=2")
    for method in ("rredcot", "grpo"):
        run = out / method / "seed0"
        cfg = (run / "config.yaml").read_text()
        assert "name: pairsum" in cfg and "name: last_int" in cfg, method
        sample = json.loads(sorted((run / "samples").glob("*.jsonl"))[0].read_text().splitlines()[0])
        assert sample["prompt"].endswith("=?\n") and "+" in sample["prompt"]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any("reward/mean" in r for r in rows)
    # warm-started on the task's own reference traces (40 debug steps): it writes their format already
    first = [
        json.loads(line)
        for line in sorted((out / "rredcot" / "seed0" / "samples").glob("*.jsonl"))[0].read_text().splitlines()
    ]
    assert sum(r["completion"].startswith("<think>") for r in first) >= len(first) // 2, first
    assert (out / "report.md").exists()
    # eval reads the run's own config (the plug-in task and verifier); the plug-in module itself is imported only
    # when the user names it on the command line (a run directory never decides to run code)
    refused = cli("eval", f"checkpoint={out / 'rredcot' / 'seed0'}", check=False)
    assert refused.returncode == 2 and f"plugins=[{user_dir / 'pairsum.py'}]" in " ".join(refused.stderr.split())
    proc = cli("eval", f"checkpoint={out / 'rredcot' / 'seed0'}", f"plugins=[{user_dir / 'pairsum.py'}]")
    result = json.loads(next((out / "rredcot" / "seed0" / "evals").glob("*.json")).read_text())
    assert result["task"] == "pairsum" and result["verifier"] == "last_int", proc.stdout


def test_list_shows_plugin_entries_and_groups(user_dir):
    out = cli("list", *_plugin_args(user_dir)[:2]).stdout
    assert "pairsum" in out and "last_int" in out


def test_an_installed_packages_entry_point_is_loaded(tmp_path):
    site = tmp_path / "site"
    (site / "ep_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "ep_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n")
    (site / "ep_plugin-0.1.dist-info" / "entry_points.txt").write_text("[rredcot.plugins]\nhalves = ep_plugin\n")
    (site / "ep_plugin.py").write_text(
        "from rredcot.registry import register\n"
        "@register('segment', 'halves')\n"
        "def halves(trace):\n    return [0, trace.end // 2, trace.end]\n"
    )
    out = cli("list", env={"PYTHONPATH": str(site)}).stdout
    assert "halves" in out
    cli("config", "show", "segment.name=halves", env={"PYTHONPATH": str(site)})
