"""Helpers for real CPU runs of the CLI (each one a fresh `python -m rredcot` process)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ASSETS_DIR = REPO / "tests" / "assets"


def cli(*args: str, check: bool = True, timeout: int = 600, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `python -m rredcot ARGS` the way a user would (extra `env` variables, in `cwd`); returns the finished process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "rredcot", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"rredcot {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


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
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    cfg = OmegaConf.create({"arch": "qwen2", "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2,
                            "max_positions": 512})
    build_tiny(cfg, len(tok), seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path
