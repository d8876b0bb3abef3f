"""Each tracker of logging.report_to writes a run that its own reader opens, offline: TensorBoard's
EventAccumulator reads the event files, wandb's offline run file holds the steps (read with wandb's own
Record protobuf), trackio's local store gives the logs back (its SQLiteStorage). One tiny run feeds all three."""

import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

from .conftest import cli

MISSING = [n for n in ("tensorboard", "wandb", "trackio") if importlib.util.find_spec(n) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"not installed: {MISSING} (pip install -e '.[dev]' installs every tracker)"
)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """(run directory, trackio directory) of a 2-step run reporting to every tracker."""
    tmp = tmp_path_factory.mktemp("trackers")
    run, env = tmp / "run", {"WANDB_MODE": "offline", "TRACKIO_DIR": str(tmp / "trackio")}
    env.update({f"WANDB_{k}": str(tmp / f"wandb_{k.lower()}") for k in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR")})
    steps = ("train.steps=2", "train.log_every=1", "train.eval_every=0", "eval.n_prompts=2", "train.samples_per_log=2")
    cli("train", "debug=fast", *steps, "logging.report_to=[tensorboard,wandb,trackio]", f"run_dir={run}",
        "logging.run_name=tiny", "logging.progress=false", env=env)  # fmt: skip
    return run, tmp / "trackio"


def _steps(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward/mean" in r]


def test_tensorboards_reader_finds_the_step_metrics(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = tracked
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("reward/mean")
    assert [e.step for e in events] == [1, 2]
    assert [round(e.value, 5) for e in events] == [round(r["reward/mean"], 5) for r in _steps(run)]


def _wandb_records(path):
    """The records of a .wandb file: wandb's log format (a 7-byte header, 32 KiB blocks of chunks with a
    7-byte header each) around its own protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def test_wandb_writes_an_offline_run_with_the_steps_and_the_completions_table(tracked):
    run, _ = tracked
    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in _wandb_records(path)
        if r.WhichOneof("record_type") == "history"
    ]
    by_step = {h["_step"]: h for h in history if "reward/mean" in h}  # step 0: the evaluation before training
    assert sorted(by_step) == [1, 2]
    assert [round(by_step[s]["reward/mean"], 5) for s in (1, 2)] == [round(r["reward/mean"], 5) for r in _steps(run)]
    assert any(h.get("completions/_type") == "table-file" for h in history)
    run_rec = next(r.run for r in _wandb_records(path) if r.WhichOneof("record_type") == "run")
    assert run_rec.display_name == "tiny" and run_rec.project == "rredcot"


TRACKIO_READER = """
import json
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps({"runs": SQLiteStorage.get_runs("rredcot"), "logs": SQLiteStorage.get_logs("rredcot", "tiny")}))
"""


def test_trackio_keeps_the_run_in_its_local_store(tracked):
    run, store = tracked
    # trackio reads TRACKIO_DIR when it is imported: its reader runs where that is the run's store
    out = subprocess.run(
        [sys.executable, "-c", TRACKIO_READER], env={**os.environ, "TRACKIO_DIR": str(store)}, capture_output=True,
        text=True, check=True, timeout=120,
    )  # fmt: skip
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["runs"] == ["tiny"]
    rewards = {r["step"]: r["reward/mean"] for r in found["logs"] if "reward/mean" in r}
    assert [round(rewards[s], 5) for s in (1, 2)] == [round(r["reward/mean"], 5) for r in _steps(run)]
    tables = [r["completions"] for r in found["logs"] if "completions" in r]
    assert tables and tables[0]["_type"] == "trackio.table" and "completion" in tables[0]["_value"][0]
