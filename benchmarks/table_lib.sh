# Shared by the table scripts (sourced after OUT and WIN are set): print each command before it
# runs, and skip a step whose output exists (resumable; delete OUT to start over).
H=.venv/bin/harp-vllm
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }
prune() {
  local out=$1; shift
  [ -f "$out/config.json" ] || run $H prune smollm2-135m --out "$out" "$@" --eval-windows 0 \
    --force --report "$out.prune.json"
}
ppl() { [ -f "$2" ] || run $H eval ppl --model "$1" --seq-len 2048 --max-windows "$WIN" --out "$2"; }
# One table row: prune into OUT/NAME, then its test perplexity into OUT/NAME.json (only the
# rows named in ROWS, when it is set).
row() {
  local name=$1; shift
  if [ -n "${ROWS:-}" ] && [[ " $ROWS " != *" $name "* ]]; then return; fi
  prune "$OUT/$name" "$@"; ppl "$OUT/$name" "$OUT/$name.json"
}
