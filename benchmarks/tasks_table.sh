#!/usr/bin/env bash
# Task quality table of docs/results.md: dense SmolLM2-135M and HARP checkpoints through vLLM
# (in-process engine with the plugin), lm-eval prompts and metrics on the local data.
# Usage: bash benchmarks/tasks_table.sh [OUT_DIR] [HARP_TABLE_DIR] ; resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/tasks}
HT=${2:-out/harp-table}
LIMITS=(--limit "${LIMIT:-100}" --limit "gsm8k=${LIMIT_GSM8K:-25}" --limit "triviaqa=${LIMIT_TRIVIAQA:-50}")
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }
for pair in dense=smollm2-135m harp-p4=$HT/harp-top4 harp-p8=$HT/harp-top8 \
            harp-p8-alpha1=$HT/alpha1-top8; do
  label=${pair%%=*}; model=${pair#*=}
  [ -f "$OUT/$label.json" ] || run .venv/bin/harp-vllm eval tasks --model "$model" --tasks all \
    "${LIMITS[@]}" --label "$label" --out "$OUT/$label.json"
done
