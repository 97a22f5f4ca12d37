#!/usr/bin/env bash
# The native side of the compose load test (docs/results.md): the same compose file as local
# processes (`harp-vllm stack`), with the settings of scripts/compose_test.sh and the same
# checkpoint, then the same load test through the native gateway.
#
#   bash scripts/compose_native_loadtest.sh CHECKPOINT [OUT]
#
# CHECKPOINT: the 27% plan's directory, e.g. the one make compose-test left in the podman
# volume: $(podman volume inspect -f '{{.Mountpoint}}' harpct_models)/smollm2-plan27. It is
# copied into a scratch model cache (the prepared dense model comes from $HARP_VLLM_CACHE or
# ~/.cache/harp-vllm), so model-prep finds it and does not plan again.
#
# Any other dense/pruned pair through the same stack (the long-context A/B of issue 25):
#   HARP_MODEL        the dense model's known name [smollm2-135m]; prepared beforehand
#   HARP_PRUNED_NAME  the pruned model's served name [smollm2-plan27]
#   HARP_MAX_MODEL_LEN  both servers' context [8192, the compose default]
#   HARP_LOADTEST_ARGS  the load test's options [--quick --no-progress]
#   HARP_GATEWAY_READ_TIMEOUT, HARP_GATEWAY_REQUEST_TIMEOUT  the gateway's backend timeouts,
#                     seconds [300, 600]; queued capacity-bound requests can need more
#   VLLM_CPU_KVCACHE_SPACE  KV cache per server, GiB [1]
#   VLLM_CPU_OMP_THREADS_BIND  both servers' thread binding [auto: each computes on one core;
#                     "0-1": each on both, as only one side is loaded at a time]
#   HARP_DENSE_VLLM_ARGS, HARP_PRUNED_VLLM_ARGS  more vLLM flags per server, e.g.
#                     "--max-num-seqs 4" (deploy/.env.example)
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CKPT=${1:?usage: compose_native_loadtest.sh CHECKPOINT [OUT]}
OUT=${2:-$ROOT/out/compose-test/native-loadtest}
VENV=${VENV:-$ROOT/.venv}
HV=$VENV/bin/harp-vllm
SRC_CACHE=${HARP_VLLM_CACHE:-$HOME/.cache/harp-vllm}
[[ -f $CKPT/config.json ]] || { echo "no checkpoint in $CKPT" >&2; exit 2; }
MODEL=${HARP_MODEL:-smollm2-135m} PRUNED_NAME=${HARP_PRUNED_NAME:-smollm2-plan27}
[[ -d $SRC_CACHE/models/$MODEL ]] || {
  echo "prepare $MODEL first (harp-vllm models prepare $MODEL)" >&2; exit 2; }
SCRATCH=$(mktemp -d /var/tmp/harp-native-ab.XXXXXX)
mkdir -p "$SCRATCH/cache/models"
ln -s "$SRC_CACHE/models/$MODEL" "$SCRATCH/cache/models/$MODEL"
cp -r "$CKPT" "$SCRATCH/cache/$PRUNED_NAME"

export HARP_VLLM_CACHE=$SCRATCH/cache HARP_STACK_DIR=$SCRATCH/stack
# model-prep finds the copied checkpoint; the arguments are compose_test.sh's all the same
PLAN_LAYOUT=$(grep -v '^#' "$ROOT/deploy/smollm2-plan27.layout" | tr -d '[:space:]')
export HARP_MODEL=$MODEL HARP_PRUNE_COMMAND=plan HARP_PRUNE_ARGS="--layout $PLAN_LAYOUT"
export HARP_PRUNED_NAME=$PRUNED_NAME HARP_AB_ALIAS="${MODEL%%-*}=dense:1,harp:1"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-auto}
export HARP_BIND_ADDRESS=127.0.0.1 HARP_DENSE_PORT=28101 HARP_PRUNED_PORT=28102
export HARP_GATEWAY_PORT=28180 HARP_PROMETHEUS_PORT=29190 HARP_GATEWAY_API_KEYS=""

cleanup() { "$HV" stack down || true; rm -rf "$SCRATCH"; }
trap cleanup EXIT
"$HV" stack up --timeout 900
rm -rf "$OUT"
G=http://127.0.0.1:$HARP_GATEWAY_PORT
# The loadtest service's command (deploy/docker-compose.yml) with the host's addresses.
# shellcheck disable=SC2086
"$VENV/bin/python" -m harp_vllm.loadtest --dense-url "$G" --pruned-url "$G" \
    --model-dense "$HARP_MODEL" --model-pruned "$HARP_PRUNED_NAME" \
    --metrics-url-dense "http://127.0.0.1:$HARP_DENSE_PORT/metrics" \
    --metrics-url-pruned "http://127.0.0.1:$HARP_PRUNED_PORT/metrics" \
    --out "$OUT" ${HARP_LOADTEST_ARGS:---quick --no-progress}
python3 "$ROOT/scripts/compose_check.py" loadtest "$OUT" "$CKPT/plan.json"
