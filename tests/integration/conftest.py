"""Helpers for real CPU runs of the CLI (each one its own `python -m rredcot` process, forked: see cli)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ASSETS_DIR = REPO / "tests" / "assets"


def cli(
    *args: str, check: bool = True, timeout: int = 600, env: dict | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run `python -m rredcot ARGS` the way a user would (extra `env` variables, in `cwd`); returns the finished
    process.

    The process is forked from a server that has imported the package already (tests/integration/zygote.py),
    which saves the import of torch and transformers per call; RREDCOT_TEST_REAL_PROCESSES=1 starts each one
    from a fresh interpreter instead."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", **(env or {}))
    if os.environ.get("RREDCOT_TEST_REAL_PROCESSES"):
        proc = subprocess.run(
            [sys.executable, "-m", "rredcot", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    else:
        proc = _ZYGOTE.run(list(args), env, Path(cwd), timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"rredcot {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


class _Zygote:
    """The fork server of this test process, started on first use and restarted if it died."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        from tests.integration import zygote

        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.zygote"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert zygote.recv(self.proc.stdout.fileno())[0] == "ready"

    def run(self, args: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        import select
        import signal
        import tempfile

        from tests.integration import zygote

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            zygote.send(self.proc.stdin.fileno(), (args, env, str(cwd), out, err))
            reply = self.proc.stdout.fileno()
            _, pid = zygote.recv(reply)
            if not select.select([reply], [], [], timeout)[0]:
                os.kill(pid, signal.SIGKILL)
                zygote.recv(reply)
                raise subprocess.TimeoutExpired(["rredcot", *args], timeout)
            _, code = zygote.recv(reply)
            read = lambda path: open(path, encoding="utf-8", errors="replace").read()  # noqa: E731
            return subprocess.CompletedProcess(["rredcot", *args], code, read(out), read(err))


_ZYGOTE = _Zygote()


def run_main(line: str, **fmt) -> tuple[int, str]:
    """`rredcot LINE` through the real entry point in this process: (exit status, stderr)."""
    import io
    from contextlib import redirect_stderr

    from rredcot.cli import main

    argv = ["rredcot", *shlex.split(line.format(**fmt))]
    err = io.StringIO()
    old, sys.argv = sys.argv, argv
    try:
        with redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, err.getvalue()


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory) -> Path:
    """One real debug=fast training run shared by the tests that only read its results."""
    run = tmp_path_factory.mktemp("runs") / "fast"
    cli("train", "debug=fast", f"run_dir={run}", "logging.progress=false")
    return run


@pytest.fixture(scope="session")
def hub_shaped_model(tmp_path_factory) -> Path:
    """A local model directory shaped like a hub model: save_pretrained weights + tokenizer + chat template."""
    from omegaconf import OmegaConf

    from rredcot.task.model import build_tiny, load_tokenizer

    path = tmp_path_factory.mktemp("models") / "tiny-chat"
    tok = load_tokenizer("builtin")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    cfg = OmegaConf.create(
        {"arch": "qwen2", "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "max_positions": 512}
    )
    build_tiny(cfg, len(tok), seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path
