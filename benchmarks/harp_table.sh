#!/usr/bin/env bash
# Builds every checkpoint and perplexity of the HARP table in docs/results.md (SmolLM2-135M,
# section 2: WikiText-2 test, 8 windows of 2048 unless EVAL_WINDOWS says otherwise).
# Usage: bash benchmarks/harp_table.sh [OUT_DIR] ; each command is printed before it runs;
# resumable (existing outputs are skipped; delete OUT_DIR to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/harp-table}
WIN=${EVAL_WINDOWS:-8}
# shellcheck source=benchmarks/table_lib.sh
source benchmarks/table_lib.sh
ppl smollm2-135m "$OUT/dense.json"
for P in 4 8 12; do
  prune "$OUT/harp-top$P" --layers "$P"
  prune "$OUT/alpha1-top$P" --layers "$P" --alpha 1
  prune "$OUT/alpha0-top$P" --layers "$P" --alpha 0
  prune "$OUT/harp-bottom$P" --layers "$P" --position bottom
  for v in harp-top alpha1-top alpha0-top harp-bottom; do
    ppl "$OUT/$v$P" "$OUT/$v$P.json"
  done
done
