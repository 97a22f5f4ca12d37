#!/usr/bin/env bash
# The long-context quality report of docs/results.md section 11 (issue 23): dense SmolLM2,
# the planner's 27% and 40% plans calibrated on WikiText-2 validation alone and on a mix of
# four domains' dev parts (--calib-mix), and linear maps at P = 8, all through vLLM with the
# plugin; wplan27/wplan50 are plans with sliding windows offered (issue 24, --windows);
# wplan27s is wplan27's layout with fitted sink logits on its windows (--window-sinks, the
# default cap on a sink's short-context cost), wplan27s-all the same with a sink on every
# windowed layer (no cap), wplan27sl the same with the layers over the cap keeping a lowered
# sink (--sink-over-cap lower); wplan27n a 27% plan offered a window only where its sink is
# under the cap (--sink-over-cap no-window); wplan40s is a 40% plan with windows and sinks,
# wplan40s-rp the same with its best layouts re-scored with the recall probe (weight 1),
# wplan40s-rp-all its layout with a sink on every windowed layer; plan27-self the 27% plan
# calibrated on text sampled from the dense model itself (--calib-self, no external data);
# the -ho plans are the same with every map's ridge chosen by held-out error (--ridge held-out),
# the -hod ones also with the maps' damage measured out of sample (--held-out-damage);
# splan50-hod is wplan50-hod with cross-layer KV sharing offered too (--share-targets 2);
# wplan50s-hod is wplan50-hod with sink logits on its windows; wgplan50s-hod the same offered
# windows of 2,048 that keep one KV group whole too (--group-windows 2048), its best layouts
# re-scored with the recall probe (weight 1); rplan50s-hod the same planned once per
# retrieval floor (--retrieval-floor 0.3,0.6,0.9: each layout keeps that fraction of the
# probe's retrieval mass), the best re-scored wins; rdplan50s-hod the same with the probe's
# facts at six depths (--recall-depths: recalled from 0.7k to 6.8k tokens back) and the mass
# counted beyond the smallest window (--retrieval-beyond 512), so it tells the window sizes apart.
# wnplan50s-hod is rplan50s-hod offered windows alone (--candidates window,group-window: no
# map takes a KV group's context; floors 0.3,0.5,0.6).
# Resumable: checkpoints and per-model runs (out/quality-$PRESET/runs) are reused.
#   bash benchmarks/quality_smollm2.sh            # PRESET=quick (default) or full
#   MODELS="plan27 plan27-mix lin8" bash benchmarks/quality_smollm2.sh   # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-quick}
MODELS=${MODELS:-plan27 plan27-mix lin8 plan40 plan40-mix}
H=.venv/bin/harp-vllm
MIX=wikitext,python,boolq,gsm8k
WINDOWS=512,1024,2048
run() { echo "+ $*"; "$@"; }
layout_of() {  # a built plan's layout
  .venv/bin/python -c "import json, sys; print(json.load(open(sys.argv[1]))['layout'])" \
    "out/smollm2-$1/plan.json"
}
build() {
  local out=out/smollm2-$1
  [ -f "$out/config.json" ] && return
  case $1 in
    plan27) run $H plan smollm2-135m --out "$out" --kv-saving 0.27 ;;
    plan40) run $H plan smollm2-135m --out "$out" --kv-saving 0.40 ;;
    plan27-self) run $H plan smollm2-135m --out "$out" --kv-saving 0.27 --calib-self ;;
    plan27-mix) run $H plan smollm2-135m --out "$out" --kv-saving 0.27 --calib-mix "$MIX" ;;
    plan40-mix) run $H plan smollm2-135m --out "$out" --kv-saving 0.40 --calib-mix "$MIX" ;;
    lin8) run $H prune smollm2-135m --out "$out" --method linear --layers 8 ;;
    wplan27) run $H plan smollm2-135m --out "$out" --kv-saving 0.27 --windows "$WINDOWS" ;;
    wplan27s) build wplan27
      run $H plan smollm2-135m --out "$out" --layout "$(layout_of wplan27)" --window-sinks ;;
    wplan27s-all) build wplan27
      run $H plan smollm2-135m --out "$out" --layout "$(layout_of wplan27)" --window-sinks \
        --sink-max-short-kl 1e9 ;;
    wplan27sl) build wplan27
      run $H plan smollm2-135m --out "$out" --layout "$(layout_of wplan27)" --window-sinks \
        --sink-over-cap lower ;;
    wplan27n) run $H plan smollm2-135m --out "$out" --kv-saving 0.27 --windows "$WINDOWS" \
      --window-sinks --sink-over-cap no-window ;;
    wplan40s) run $H plan smollm2-135m --out "$out" --kv-saving 0.40 --windows "$WINDOWS" --window-sinks ;;
    wplan40s-rp) run $H plan smollm2-135m --out "$out" --kv-saving 0.40 --windows "$WINDOWS" \
      --window-sinks --recall-probe 1 ;;
    wplan40s-rp-all) build wplan40s-rp
      run $H plan smollm2-135m --out "$out" --layout "$(layout_of wplan40s-rp)" --window-sinks \
        --sink-max-short-kl 1e9 --recall-probe 1 ;;
    wplan27-ho) run $H plan smollm2-135m --out "$out" --kv-saving 0.27 --windows "$WINDOWS" \
      --ridge held-out ;;
    wplan40s-ho) run $H plan smollm2-135m --out "$out" --kv-saving 0.40 --windows "$WINDOWS" \
      --window-sinks --ridge held-out ;;
    wplan40s-hod) run $H plan smollm2-135m --out "$out" --kv-saving 0.40 --windows "$WINDOWS" \
      --window-sinks --ridge held-out --held-out-damage ;;
    plan27-hod) run $H plan smollm2-135m --out "$out" --kv-saving 0.27 --ridge held-out \
      --held-out-damage ;;
    wplan50) run $H plan smollm2-135m --out "$out" --kv-saving 0.50 --windows "$WINDOWS" --top-k 4 ;;
    wplan50-hod) run $H plan smollm2-135m --out "$out" --kv-saving 0.50 --windows "$WINDOWS" \
      --top-k 4 --ridge held-out --held-out-damage ;;
    wplan50s-hod) run $H plan smollm2-135m --out "$out" --kv-saving 0.50 --windows "$WINDOWS" \
      --top-k 4 --window-sinks --ridge held-out --held-out-damage ;;
    wgplan50s-hod) run $H plan smollm2-135m --out "$out" --kv-saving 0.50 --windows "$WINDOWS" \
      --group-windows 2048 --top-k 4 --window-sinks --ridge held-out --held-out-damage \
      --recall-probe 1 ;;
    rplan50s-hod) run $H plan smollm2-135m --out "$out" --kv-saving 0.50 --windows "$WINDOWS" \
      --group-windows 2048 --top-k 1 --window-sinks --ridge held-out --held-out-damage \
      --recall-probe 1 --retrieval-floor 0.3,0.6,0.9 ;;
    rdplan50s-hod) run $H plan smollm2-135m --out "$out" --kv-saving 0.50 --windows "$WINDOWS" \
      --group-windows 2048 --top-k 1 --window-sinks --ridge held-out --held-out-damage \
      --recall-probe 1 --recall-depths 0.05,0.3,0.6,0.75,0.85,0.9 \
      --retrieval-floor 0.4,0.5,0.6,0.7 --retrieval-beyond 512 ;;
    wnplan50s-hod) run $H plan smollm2-135m --out "$out" --kv-saving 0.50 --windows "$WINDOWS" \
      --group-windows 2048 --candidates window,group-window --top-k 1 --window-sinks \
      --ridge held-out --held-out-damage --recall-probe 1 --retrieval-floor 0.3,0.5,0.6 ;;
    splan50-hod) run $H plan smollm2-135m --out "$out" --kv-saving 0.50 --windows "$WINDOWS" \
      --share-targets 2 --top-k 4 --ridge held-out --held-out-damage ;;
    *) echo "unknown model $1" >&2; exit 2 ;;
  esac
}
paths=()
for m in $MODELS; do build "$m"; paths+=("out/smollm2-$m"); done
run $H eval quality smollm2-135m "${paths[@]}" --preset "$PRESET" --out "out/quality-$PRESET"
