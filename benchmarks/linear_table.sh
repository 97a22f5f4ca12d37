#!/usr/bin/env bash
# Builds the checkpoints and perplexities of the linear-replacement comparison in
# docs/results.md (issue 18): linear maps (selection, rank, input, fitting order, calibration
# size, refinement) beside HARP and FLAP at the same KV saving (P = 4, 8, 12 of 30 layers =
# 12, 24, 36 of 90 KV groups). Each row: prune, then WikiText-2 test perplexity (8 x 2048).
# Usage: bash benchmarks/linear_table.sh [OUT_DIR] ; resumable (existing outputs are skipped).
#   ROWS="harp8 lin8" bash benchmarks/linear_table.sh [OUT_DIR]   # only those rows (and dense)
# The P = 4, 8 (lin8) and 12 selections were measured when --select damage scored layers on
# 16 windows (the default is 8 now: lin8-timed), hence --select-windows 16 on those rows.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/linear-table}
WIN=${EVAL_WINDOWS:-8}
# shellcheck source=benchmarks/table_lib.sh
source benchmarks/table_lib.sh
ppl smollm2-135m "$OUT/dense.json"
row lin8-timed --method linear --layers 8                 # the default (--select damage)
row harp8 --layers 8                                      # HARP, searched alphas (timed)
row flap8 --method flap --ratio 0.2667 --allocation global  # 24 of 90 KV groups
row lin8 --method linear --layers 8 --select-windows 16  # kv_fp8_tasks.sh
row lin8-top --method linear --layers 8 --select top
row lin4 --method linear --layers 4 --select-windows 16
row lin12 --method linear --layers 12 --select-windows 16
row flap4 --method flap --ratio 0.1334 --allocation global  # 12 groups
row flap12 --method flap --ratio 0.4 --allocation global    # 36 groups
row lin8-full --method linear --layers 8 --rank full
row lin8-raw --method linear --layers 8 --input raw
row lin8-seq --method linear --layers 8 --fit-order sequential
row lin8-res --method linear --layers 8 --fit-order residual
row lin8-c16 --method linear --layers 8 --calib-samples 16
row lin8-top-full --method linear --layers 8 --select top --rank full
row lin8-top-raw --method linear --layers 8 --select top --input raw
row lin8-c256 --method linear --layers 8 --calib-samples 256
row lin8-refine --method linear --layers 8 --refine-steps "${REFINE_STEPS:-100}"
# "What each choice does" (benchmarks/linear_choices_table.py prints it): top 8 with a full-rank
# map and another calibration, fitting order or refinement; full-rank damage on 32 windows
row lin8-top-full-c2048 --method linear --layers 8 --select top --rank full \
  --calib-samples 8 --calib-seq-len 2048
row lin8-top-full-res --method linear --layers 8 --select top --rank full --fit-order residual
row lin8-top-res --method linear --layers 8 --select top --fit-order residual
row lin8-top-full-refine --method linear --layers 8 --select top --rank full --refine-steps 100
row lin8-full-d32 --method linear --layers 8 --rank full --select-windows 32
row lin8-full-d32-seq --method linear --layers 8 --rank full --select-windows 32 \
  --fit-order sequential
