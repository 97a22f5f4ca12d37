#!/usr/bin/env bash
# The A/B load test of docs/results.md: dense SmolLM2-135M vs a HARP-pruned checkpoint, each on
# its own `harp-vllm serve` with the same KV-cache budget, then `harp-vllm loadtest`.
# Usage: bash benchmarks/loadtest_smollm2.sh PRUNED_DIR OUT_DIR [loadtest options ...]
# Environment: KV_BYTES (KV-cache bytes per server, default 256 MiB so the capacity scenario
# saturates the dense server), MAX_MODEL_LEN (default 4608: vLLM refuses a context the KV budget
# cannot hold once), VLLM_CPU_OMP_THREADS_BIND (default auto; equal for both).
set -euo pipefail
cd "$(dirname "$0")/.."
PRUNED=${1:?usage: loadtest_smollm2.sh PRUNED_DIR OUT_DIR [loadtest options]}
OUT=${2:?usage: loadtest_smollm2.sh PRUNED_DIR OUT_DIR [loadtest options]}
shift 2
KV=${KV_BYTES:-268435456}
H=.venv/bin/harp-vllm
mkdir -p "$OUT"
unset VLLM_CPU_KVCACHE_SPACE  # it would override --kv-cache-memory-bytes
common=(--dtype float32 --enforce-eager --max-model-len "${MAX_MODEL_LEN:-4608}" --kv-cache-memory-bytes "$KV"
        --host 127.0.0.1)
$H serve smollm2-135m --port 8101 "${common[@]}" > "$OUT/dense-server.log" 2>&1 &
DENSE=$!
$H serve "$PRUNED" --served-model-name smollm2-harp-p8 --port 8102 "${common[@]}" \
  > "$OUT/pruned-server.log" 2>&1 &
PRUNED_PID=$!
trap 'kill -TERM $DENSE $PRUNED_PID 2>/dev/null || true; wait' EXIT
for side in dense:8101:$DENSE pruned:8102:$PRUNED_PID; do
  IFS=: read -r name port pid <<< "$side"
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
    kill -0 "$pid" 2>/dev/null || { echo "the $name server died; see $OUT/$name-server.log" >&2
                                    tail -5 "$OUT/$name-server.log" >&2; exit 1; }
    sleep 2
  done
done
echo "+ $H loadtest --dense-url http://127.0.0.1:8101 --pruned-url http://127.0.0.1:8102 --out $OUT $*"
$H loadtest --dense-url http://127.0.0.1:8101 --pruned-url http://127.0.0.1:8102 --out "$OUT" "$@"
