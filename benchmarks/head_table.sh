#!/usr/bin/env bash
# Builds the checkpoints and perplexities of the head-level comparison in docs/results.md
# (issue 9): AMP, FLAP and Wanda-sp at HARP P=8's attention-head ratio (8/30 = 72 of 270
# SmolLM2 heads = 24 of 90 KV groups) beside HARP P=8 (searched alphas) and alpha = 1.
# Usage: bash benchmarks/head_table.sh [OUT_DIR] ; resumable (existing outputs are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/head-table}
WIN=${EVAL_WINDOWS:-8}
# shellcheck source=benchmarks/table_lib.sh
source benchmarks/table_lib.sh
ppl smollm2-135m "$OUT/dense.json"
prune "$OUT/harp-top8" --layers 8
prune "$OUT/alpha1-top8" --layers 8 --alpha 1
R=0.2667  # round(0.2667 * 90 groups) = 24 groups = 72 heads, HARP P=8's share
for M in amp flap wanda-sp; do
  prune "$OUT/$M-global" --method "$M" --ratio "$R" --allocation global
done
prune "$OUT/flap-global-nobias" --method flap --ratio "$R" --allocation global \
  --no-bias-compensation
# Uniform per layer (the AMP and Wanda-sp papers' rule) cannot hit 24 of 3 groups x 30
# layers: at 8/30 AMP rounds 0.8 up to 1 group per layer and Wanda-sp truncates it to 0, so
# the uniform rows remove 1 group in every layer (30 groups = 90 heads, 1/3).
for M in amp flap wanda-sp; do
  prune "$OUT/$M-uniform" --method "$M" --ratio 0.3334 --allocation uniform
done
# Score vs bias: FLAP's scores without its bias, Wanda-sp's scores with FLAP's bias
prune "$OUT/flap-uniform-nobias" --method flap --ratio 0.3334 --allocation uniform \
  --no-bias-compensation
prune "$OUT/wanda-sp-uniform-bias" --method wanda-sp --ratio 0.3334 --allocation uniform \
  --bias-compensation
# Heads and MLP channels together (20% of the MLP channels as well)
prune "$OUT/flap-global-mlp20" --method flap --ratio "$R" --mlp-ratio 0.2 --allocation global
prune "$OUT/amp-uniform-mlp20" --method amp --ratio 0.3334 --mlp-ratio 0.2 --allocation uniform
for v in flap-global-mlp20 amp-uniform-mlp20 harp-top8 alpha1-top8 amp-global flap-global flap-global-nobias wanda-sp-global \
         amp-uniform flap-uniform wanda-sp-uniform flap-uniform-nobias wanda-sp-uniform-bias; do
  ppl "$OUT/$v" "$OUT/$v.json"
done
