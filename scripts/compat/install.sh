#!/bin/sh
# Build the venv of `make test-compat`: rredcot on the LOWEST releases pyproject.toml admits (floors.txt),
# CPU torch, and the test tools, then check that what got installed is exactly floors.txt.
#   sh scripts/compat/install.sh [VENV] [FLOORS]       (defaults: .venv-compat scripts/compat/floors.txt)
# A venv whose pip no longer runs is rebuilt from scratch: a copy of the checkout that honours .gitignore
# files (the device tool's, a worktree sync) drops pip's own `build/` and hydra's generated parsers from it.
set -e
VENV=${1:-.venv-compat}
FLOORS=${2:-scripts/compat/floors.txt}
PYTHON=${PYTHON:-python3}
PY=$VENV/bin/python
if ! "$PY" -m pip --version >/dev/null 2>&1 || ! "$PY" -c "import hydra.core.override_parser.overrides_parser" 2>/dev/null; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
# torch: the CPU build of install_torch.sh (2.13.0; an unpinned torch pulls gigabytes of CUDA). The floor
# torch>=2.4 itself is not installed here: no CPU wheel of it is on this machine's disk (see README).
TORCH_INDEX="${TORCH_INDEX:-}" sh scripts/install_torch.sh "$PY"
# -c pins every floor (and only those): pip then picks the newest of everything else that fits them, as a
# user's resolver would. The dev extra's trackers (tensorboard, wandb, trackio) are left out: they are
# optional extras with no floor of ours, and the subset's tracker tests do not import them.
"$PY" -m pip install -q -c "$FLOORS" -e . "pytest>=8" "pytest-xdist>=3.5" "hypothesis>=6" peft
"$PY" - "$FLOORS" <<'EOF'
import sys
from importlib.metadata import version

wrong = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, want = line.split("==")
        if version(name) != want:
            wrong.append(f"{name} {version(name)} (floors.txt: {want})")
if wrong:
    sys.exit("installed releases differ from the floors: " + ", ".join(wrong))
print("compat venv: every floor installed exactly")
EOF
