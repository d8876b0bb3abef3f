#!/usr/bin/env bash
# The estimator and segmenter tables of docs/results.md ("A fair test of the premise"): every estimator against Monte
# Carlo values on both built-in families (12 dev prompts x 8 traces, MC 8 samples per boundary), then every
# segmenter. Each report goes to runs/credit_<name>/ (credit.json, credit.html); a finished one is skipped.
#   bash scripts/credit_tables.sh          (about 40 minutes on 2 CPU cores; ONLY_NEW=1: the issue-20 rows only)
set -euo pipefail
cd "$(dirname "$0")/.."
RREDCOT="${RREDCOT:-.venv/bin/rredcot}"
Q="'"
COMMON="rredcot,${Q}rredcot:include_reference=false${Q},${Q}rredcot:self_normalize=true${Q},${Q}rredcot:mc_boundaries=2${Q},${Q}rredcot:mc_boundaries=3${Q},verdict,attention,uniform"
SO="${Q}rredcot:extra_forcings=[[\"so x=\",\"\\n\"]]${Q},${Q}rredcot:extra_forcings=[[\"so x=\",\"\\n\"]],self_normalize=true${Q}"
SEG="credit.segmenters=[fixed,newline,keyword,entropy,hybrid]"
FEW="credit.estimators=[rredcot,${Q}rredcot:self_normalize=true${Q},uniform]"
run() {
  local out=$1; shift
  [ -f "$out/credit.json" ] && { echo "$out: done"; return; }
  rm -rf "$out"
  "$RREDCOT" credit credit.against=mc credit.prompts=12 credit.mc_samples=8 eval.split=dev run_dir="$out" logging.progress=false "$@"
}
BANK="credit.estimators=[rredcot,reference,${Q}reference:solution_from=start${Q},${Q}reference:bank=both${Q},${Q}reference:length_normalize=true${Q},${Q}rredcot:solution_weight=0.5${Q},vps,uniform]"
if [ -n "${ONLY_NEW:-}" ]; then
  run runs/credit_vps_chain "credit.estimators=[rredcot,vps,uniform]"
  run runs/credit_vps_search "credit.estimators=[rredcot,vps,uniform]" +exp=search
# issue 20: the reference-solution bank (aligned / whole solution / with the group's right traces / per-token), mixed 50:50
run runs/credit_bank_chain "$BANK"
run runs/credit_bank_search "$BANK" +exp=search
  run runs/credit_bank_chain "$BANK"
  run runs/credit_bank_search "$BANK" +exp=search
  exit 0
fi
run runs/credit_chain "credit.estimators=[$COMMON]"
run runs/credit_search "credit.estimators=[$COMMON,$SO]" +exp=search
run runs/credit_seg_search "$FEW" "$SEG" +exp=search
run runs/credit_seg_chain "$FEW" "$SEG"
# issue 20: GRPO-VPS (the gold answer's probability alone) beside rredcot and GRPO's trace advantage, same settings
run runs/credit_vps_chain "credit.estimators=[rredcot,vps,uniform]"
run runs/credit_vps_search "credit.estimators=[rredcot,vps,uniform]" +exp=search
# issue 20: the reference-solution bank (aligned / whole solution / with the group's right traces / per-token), mixed 50:50
run runs/credit_bank_chain "$BANK"
run runs/credit_bank_search "$BANK" +exp=search
