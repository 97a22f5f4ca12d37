#!/usr/bin/env bash
# The long-context quality report of docs/results.md section 11 (issue 23): dense SmolLM2,
# the planner's 27% and 40% plans calibrated on WikiText-2 validation alone and on a mix of
# four domains' dev parts (--calib-mix), and linear maps at P = 8, all through vLLM with the
# plugin. Resumable: checkpoints and per-model runs (OUT/report/runs) are reused.
#   bash benchmarks/quality_smollm2.sh                 # PRESET=quick (default) or full
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/quality}
PRESET=${PRESET:-quick}
H=.venv/bin/harp-vllm
MIX=wikitext,python,boolq,gsm8k
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }
plan() { [ -f "$OUT/$1/config.json" ] || run $H plan smollm2-135m --out "$OUT/$1" "${@:2}"; }
plan plan27 --kv-saving 0.27
plan plan40 --kv-saving 0.40
plan plan27-mix --kv-saving 0.27 --calib-mix "$MIX"
plan plan40-mix --kv-saving 0.40 --calib-mix "$MIX"
[ -f "$OUT/lin8/config.json" ] || run $H prune smollm2-135m --out "$OUT/lin8" --method linear \
  --layers 8 --eval-windows 0
run $H eval quality smollm2-135m "$OUT/plan27" "$OUT/plan27-mix" "$OUT/plan40" \
  "$OUT/plan40-mix" "$OUT/lin8" --label dense --label plan27 --label plan27-mix \
  --label plan40 --label plan40-mix --label lin8 --preset "$PRESET" --out "$OUT/report-$PRESET"
