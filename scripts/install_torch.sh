#!/bin/sh
# Install PyTorch into the given interpreter, taking the cheap path where there is no GPU.
#   - torch already importable: keep it (a user's CUDA build is never replaced).
#   - no NVIDIA GPU: torch==2.13.0, whose CPU build pip finds locally on our machines; elsewhere set
#     TORCH_INDEX to PyTorch's CPU wheel index to avoid the CUDA download.
#   - a GPU: the default (CUDA) build.
set -e
PY=${1:-python3}
if "$PY" -c "import torch" 2>/dev/null; then
  echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"; exit 0
fi
if [ -n "$TORCH_INDEX" ]; then set -- --index-url "$TORCH_INDEX"; else set --; fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch>=2.4" "$@"
else
  "$PY" -m pip install -q "torch==2.13.0" "$@"
fi
