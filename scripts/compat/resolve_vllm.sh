#!/bin/sh
# Does rredcot's vllm extra resolve beside the given requirements? PyPI's answer, metadata only:
#   sh scripts/compat/resolve_vllm.sh [REQUIREMENT...]    e.g. "torch==2.15.0" "transformers>=5.20"
# prints one JSON line {"ok", "vllm", "torch", "transformers", "seconds", "conflict"} and exits with pip's
# status. No arguments: the three cases quoted in the README (make check-vllm-resolves).
# The vllm range is read from pyproject.toml's extra, so the check follows the pin.
#
# What it answered on 2026-12 (pip 23.2.1, Python 3.11, x86-64 Linux): every vLLM in >=0.22.0,<=0.31.0 pins
# torch exactly (0.22.0-0.26.0: ==2.11.0; 0.27.0-0.31.0: ==2.13.0; past the range 0.32.0: ==2.13.0, 0.33.0 and
# 0.34.0: ==2.14.0), so none resolves beside torch 2.15.0; 0.31.0 caps transformers <5.18; beside
# transformers>=5.20 the newest is vllm 0.30.0 + torch 2.13.0 + transformers 5.24.0.
set -e
PIP=${PIP:-.venv/bin/pip}
VLLM=$(sed -n 's/^vllm = \["\([^"]*\)"\].*/\1/p' pyproject.toml)
[ -n "$VLLM" ] || { echo "no vllm extra in pyproject.toml" >&2; exit 2; }

if [ $# -eq 0 ]; then
  for case in "torch==2.15.0 transformers>=5.20" "transformers>=5.20" ""; do
    # shellcheck disable=SC2086  # each case is a list of requirements without spaces inside one
    sh "$0" -- $case || true  # "--": the last case has no requirement of its own
  done
  exit 0  # the cases report; the slow test (tests/integration/test_vllm_resolves.py) asserts the answers
fi
if [ "$1" = "--" ]; then shift; fi

# PyPI's answer alone: no machine-wide pip config (ours caps torch at the wheel on this disk through a
# constraint file) and no local wheel folder. Keep a caller's own PIP_CONFIG_FILE.
export PIP_CONFIG_FILE="${PIP_CONFIG_FILE:-/dev/null}"
unset PIP_FIND_LINKS PIP_CONSTRAINT
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
start=$(date +%s)
# fast-deps reads a wheel's METADATA through HTTP range requests: without it pip downloads every candidate
# wheel whole (vllm's are ~300 MB each, and pip backtracks through all of the range).
set +e
"$PIP" install --dry-run --ignore-installed --use-feature=fast-deps --report "$TMP/report.json" \
  "$VLLM" "$@" >"$TMP/log" 2>&1
status=$?
if grep -q "invalid choice: 'fast-deps'" "$TMP/log"; then  # a pip without the feature: whole wheels, slowly
  "$PIP" install --dry-run --ignore-installed --report "$TMP/report.json" "$VLLM" "$@" >"$TMP/log" 2>&1
  status=$?
fi
set -e
seconds=$(( $(date +%s) - start ))
"${PY:-${PIP%pip}python}" - "$TMP" "$status" "$seconds" "$VLLM" "$@" <<'EOF'
import json, re, sys
from pathlib import Path

tmp, status, seconds, asked = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
out = {"asked": asked, "ok": status == 0, "seconds": seconds}
if status == 0:
    got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
           for i in json.loads((tmp / "report.json").read_text())["install"]}
    out.update({k: got.get(k) for k in ("vllm", "torch", "transformers", "tokenizers", "huggingface-hub")})
else:
    log = (tmp / "log").read_text()
    causes = re.findall(r"^\s+(vllm \S+ depends on .*)$", log, re.M)
    out["conflict"] = causes or log.strip().splitlines()[-3:]
print(json.dumps(out))
EOF
exit $status
