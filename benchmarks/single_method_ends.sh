#!/usr/bin/env bash
# The single methods at the ends of the plan frontier (10% and 50% KV saving: P = 3 and 15 of
# 30 layers, 9 and 45 of 90 KV groups), which sections 5 and 9 did not measure: linear maps
# (--select damage), FLAP (global, bias compensation), and at 10% HARP (searched alphas) and
# Gate-Norm. Each row: prune, then WikiText-2 test perplexity (8 x 2048), read by
# benchmarks/single_method_points.py (docs/results.md section 10).
# Usage: bash benchmarks/single_method_ends.sh [OUT_DIR] ; resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/single-ends}
WIN=${EVAL_WINDOWS:-8}
# shellcheck source=benchmarks/table_lib.sh
source benchmarks/table_lib.sh
row lin3 --method linear --layers 3
row flap3 --method flap --ratio 0.1 --allocation global      # 9 groups
row harp3 --layers 3
row gate-norm3 --method gate-norm --layers 3
row lin15 --method linear --layers 15
row flap15 --method flap --ratio 0.5 --allocation global     # 45 groups
# FLAP at P = 4, 8, 12 again (section 9's numbers), so their checkpoints give the per-layer
# KV heads for the predicted speed-up axis of the frontier plot
row flap4 --method flap --ratio 0.1334 --allocation global
row flap8 --method flap --ratio 0.2667 --allocation global
row flap12 --method flap --ratio 0.4 --allocation global
