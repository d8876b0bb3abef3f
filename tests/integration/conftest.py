"""Helpers for real CPU runs of the CLI (each one its own `python -m rredcot` process, forked: see cli)."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ASSETS_DIR = REPO / "tests" / "assets"


def cli(
    *args: str, check: bool = True, timeout: int = 600, env: dict | None = None, cwd: Path = REPO, real: bool = False
) -> subprocess.CompletedProcess:
    """Run `python -m rredcot ARGS` the way a user would (extra `env` variables, in `cwd`); returns the finished
    process.

    The process is forked from a server that has imported the package already (tests/integration/zygote.py),
    which saves the import of torch and transformers per call. A fresh interpreter starts instead with
    real=True, with RREDCOT_TEST_REAL_PROCESSES=1, on a machine with a GPU (a fork must not inherit a CUDA
    driver), and whenever the environment differs from the server's in a variable an import may have read
    (HF_*, PYTHONHASHSEED, OMP_NUM_THREADS, ...: only RREDCOT_*, COLUMNS, PYTHONPATH and pytest's own are
    applied in the child)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", **(env or {}))
    if real or os.environ.get("RREDCOT_TEST_REAL_PROCESSES") or shutil.which("nvidia-smi") or _ZYGOTE.stale(env):
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

    # what a child can take on; the trackers read theirs when imported, which the server never does
    APPLIED = ("RREDCOT_", "COLUMNS", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTEST_", "WANDB_", "TRACKIO_")

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))  # the server's

    def stale(self, env: dict) -> bool:
        """Whether `env` differs from the server's in a variable the server's imports may have read already."""
        keys = (set(env) | set(self.env)) - {k for k in set(env) | set(self.env) if k.startswith(self.APPLIED)}
        return any(env.get(k) != self.env.get(k) for k in keys)

    def _start(self) -> None:
        from tests.integration import zygote

        env = self.env
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
            pid = self._recv(reply)
            try:
                if not select.select([reply], [], [], timeout)[0]:
                    os.kill(pid, signal.SIGKILL)
                    self._recv(reply)
                    raise subprocess.TimeoutExpired(["rredcot", *args], timeout)
                code = self._recv(reply)
            except BaseException:  # interrupted (Ctrl-C, a timeout): the command must not outlive the test
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                raise
            read = lambda path: open(path, encoding="utf-8", errors="replace").read()  # noqa: E731
            return subprocess.CompletedProcess(["rredcot", *args], code, read(out), read(err))

    def _recv(self, fd: int):
        from tests.integration import zygote

        msg = zygote.recv(fd)
        if msg is None:
            raise RuntimeError(f"the CLI fork server (tests/integration/zygote.py) died: exit {self.proc.wait()}")
        return msg[1]


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


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A directory that `build(dir)` fills once per test session and every xdist worker shares (their base
    temp's parent is common): the first worker to ask builds it under an exclusive lock, the others wait and
    reuse it. For fixtures that train (each build is CPU the suite's 8 minutes cannot pay twice)."""
    from rredcot.task.warmstart import exclusive

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    with exclusive(root / ".lock"):  # the warm-start cache's own lock
        if not (root / ".done").exists():
            build(root)
            (root / ".done").write_text("")
    return root


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
