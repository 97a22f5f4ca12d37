#!/usr/bin/env bash
# fp8 KV cache vs full precision on task quality (issue 15, docs/results.md "fp8 KV cache"):
# LAMBADA and ARC-Easy (lm-eval prompts and metrics, local data, first N items) through the
# in-process vLLM engine with the plugin, for dense SmolLM2-135M, HARP P = 8 and linear
# replacement P = 8, each with --kv-cache-dtype auto (the model's fp32) and fp8.
# Every engine run takes the shared CPU lock. Resumable: finished JSONs are kept.
# Usage: bash benchmarks/kv_fp8_tasks.sh [OUT_DIR] [LINEAR_TABLE_DIR]
#   then: .venv/bin/python benchmarks/kv_fp8_tasks_report.py [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/kv-fp8-tasks}
LT=${2:-out/linear-table}
LIMIT=${LIMIT:-200}
LOCK=${LOCK:-/tmp/harp-heavy.lock}
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }
# the two pruned checkpoints are linear_table.sh's rows harp8 and lin8 (built there if missing)
ROWS="harp8 lin8" bash benchmarks/linear_table.sh "$LT"
for pair in dense=smollm2-135m harp-p8=$LT/harp8 linear-p8=$LT/lin8; do
  label=${pair%%=*}; model=${pair#*=}
  for kv in auto fp8; do
    f=$OUT/$label-$kv.json
    [ -f "$f" ] || run flock "$LOCK" .venv/bin/harp-vllm eval tasks --model "$model" \
      --tasks lambada_openai,arc_easy --limit "$LIMIT" --kv-cache-dtype "$kv" \
      --label "$label-$kv" --samples-out "$OUT/$label-$kv.samples" --out "$f" \
      2> >(tee "$OUT/$label-$kv.log" >&2)
  done
done
