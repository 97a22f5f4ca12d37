#!/usr/bin/env bash
# Builds the Gate-Norm / hybrid / random-layer checkpoints and perplexities of the comparison
# in docs/results.md (SmolLM2-135M; HARP top-P comes from benchmarks/harp_table.sh).
# Usage: bash benchmarks/gate_norm_table.sh [OUT_DIR] ; each command is printed before it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gn-table}
WIN=${EVAL_WINDOWS:-8}
# shellcheck source=benchmarks/table_lib.sh
source benchmarks/table_lib.sh
for K in 4 8 12; do
  prune "$OUT/gate-norm$K" --method gate-norm --layers "$K"
  ppl "$OUT/gate-norm$K" "$OUT/gate-norm$K.json"
  # The hybrid searches alphas on Gate-Norm's layers; where those are the top K layers it is
  # HARP top-P exactly (the search is deterministic), so it only runs where they differ.
  TOP=$(.venv/bin/python -c "import json; l = json.load(open('$OUT/gate-norm$K/config.json'))[
    'harp_pruning']['layers']; print(sorted(map(int, l)) == list(range(30 - $K, 30)))")
  if [ "$TOP" = False ] || [ -f "$OUT/hybrid$K/config.json" ]; then
    prune "$OUT/hybrid$K" --method hybrid --layers "$K"
    ppl "$OUT/hybrid$K" "$OUT/hybrid$K.json"
  fi
  for SEED in 0 1 2; do  # K layers drawn uniformly from all 30, attention sublayer removed
    LAYERS=$(.venv/bin/python -c "import random; print(','.join(map(str, sorted(
      random.Random($SEED).sample(range(30), $K)))))")
    prune "$OUT/random$K-s$SEED" --layer-list "$LAYERS" --alpha 0
    ppl "$OUT/random$K-s$SEED" "$OUT/random$K-s$SEED.json"
  done
done
