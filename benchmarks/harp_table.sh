#!/usr/bin/env bash
# Builds every checkpoint and perplexity of the HARP table in docs/results.md (SmolLM2-135M).
# Usage: bash benchmarks/harp_table.sh [OUT_DIR] ; each command is printed before it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/harp-table}
WIN=${EVAL_WINDOWS:-20}
H=.venv/bin/harp-vllm
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }
run $H eval ppl --model smollm2-135m --seq-len 2048 --max-windows "$WIN" --out "$OUT/dense.json"
for P in 4 8 12; do
  run $H prune smollm2-135m --out "$OUT/harp-top$P" --layers "$P" --eval-windows 0 --force \
    --report "$OUT/harp-top$P.prune.json"
  run $H prune smollm2-135m --out "$OUT/alpha1-top$P" --layers "$P" --alpha 1 --eval-windows 0 --force
  run $H prune smollm2-135m --out "$OUT/alpha0-top$P" --layers "$P" --alpha 0 --eval-windows 0 --force
  run $H prune smollm2-135m --out "$OUT/harp-bottom$P" --layers "$P" --position bottom \
    --eval-windows 0 --force --report "$OUT/harp-bottom$P.prune.json"
  for v in harp-top alpha1-top alpha0-top harp-bottom; do
    run $H eval ppl --model "$OUT/$v$P" --seq-len 2048 --max-windows "$WIN" --out "$OUT/$v$P.json"
  done
done
