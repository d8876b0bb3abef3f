#!/usr/bin/env bash
# The device check (issue 22): one prepared command for a lent GPU machine, under 8 minutes, results in one
# JSON file rewritten after each part ($OUT/gpu_check.json there, runs/gpu_check.json here). The parts and
# their sizes: scripts/gpu_check.py. Arguments go to it (--dry-run: toy sizes on CPU, what CI runs).
#
#   here, once per change of pins:  bash scripts/gpu_check.sh --fetch-wheels   (writes .whl/, git-ignored)
#   on the device (tool `run`):     bash scripts/gpu_check.sh      with carry [".whl"], timeout_s 540
#
# Which python: $PYTHON if set; else .venv's if its torch sees a GPU; else python3's if its torch sees one;
# else .venv's (or python3), and the JSON says why there is no CUDA. On the device (KINDS.md in the tool
# library, read 2026-11: Python 3.12.3, torch 2.11.0+cu130, transformers 5.17.0, accelerate 1.15.0) our
# .venv cannot come along (1.8 GB, over the 64 MiB the tool carries, its python a link into this machine's
# pyenv, and its torch the CPU build), so the image's python3 runs, with what it lacks carried as wheels in
# .whl/ and installed into /tmp/site (the tool README's recipe).
set -u
cd "$(dirname "$0")/.."

# The packages the device image lacks (its package list, KINDS.md, 2026-11-17), at the versions of our .venv.
WHEELS="hydra-core==1.3.8 omegaconf==2.3.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0 datasets==5.2.0"
WHEELS="$WHEELS dill==0.4.1 multiprocess==0.70.19"
SDISTS="antlr4-python3-runtime==4.9.3"  # published as a source archive only: built into a wheel here
DEVICE_PY=${DEVICE_PY:-3.12}

if [ "${1:-}" = "--fetch-wheels" ]; then
  set -e
  mkdir -p .whl
  PIP=${PIP:-.venv/bin/pip}
  plats=""
  for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do plats="$plats --platform $p"; done
  # shellcheck disable=SC2086  # word lists on purpose
  "$PIP" download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PY" --implementation cp $plats -d .whl $WHEELS
  # shellcheck disable=SC2086
  "$PIP" wheel -q --no-deps -w .whl $SDISTS
  ls -l .whl
  exit 0
fi

sees_gpu() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
has_torch() { "$1" -c "import torch" >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "${1:-}" = "--dry-run" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python  # CPU on purpose: no probing
elif [ -x .venv/bin/python ] && sees_gpu .venv/bin/python; then PY=.venv/bin/python
elif command -v python3 >/dev/null && sees_gpu python3; then PY=python3
elif [ -x .venv/bin/python ] && has_torch .venv/bin/python; then PY=.venv/bin/python
else PY=python3
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
lacks() { ! "$PY" -c "import hydra, omegaconf, math_verify, datasets" >/dev/null 2>&1; }
if ls .whl/*.whl >/dev/null 2>&1 && lacks; then
  pipt() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
  # all at once; failing that one at a time: a wheel for another python (multiprocess's are per version)
  # must not stop the rest
  pipt .whl/*.whl 2>/dev/null || for w in .whl/*.whl; do
    pipt "$w" || echo "gpu_check: could not install $w for $("$PY" --version 2>&1)" >&2
  done
  export PYTHONPATH="$PYTHONPATH:/tmp/site"  # only what the image lacks is there, so nothing of its own is shadowed
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
case " $* " in *" --dry-run "*) export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;; esac  # CI's 2 cores, shared
echo "gpu_check: $("$PY" -c 'import sys; print(sys.executable)' 2>&1)" >&2
exec "$PY" scripts/gpu_check.py "$@"
