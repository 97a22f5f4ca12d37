#!/usr/bin/env bash
# make compose-test: deploy/docker-compose.yml for real, in containers, on this machine kind
# (Debian bookworm, CPU only, no image registry reachable, Debian's mirrors and PyPI reachable).
#
#  1. installs podman, podman-compose, runc and debootstrap from Debian if missing;
#  2. builds a local Debian bookworm + Python 3.11 base image with debootstrap (cached);
#  3. builds the project image from docker/Dockerfile.cpu on that base (podman's layer cache),
#     and a Prometheus image from Debian's package (deploy/podman/Containerfile.prometheus);
#  4. runs the compose stack with podman-compose: model-prep (SmolLM2 + the 27% plan into the
#     `models` volume: `harp-vllm plan --layout` with the layout the planner's search chose,
#     deploy/smollm2-plan27.layout), `down` and up again (the plan is not rebuilt), vllm-dense
#     and vllm-harp until healthy, gateway and Prometheus (Grafana: not available here);
#  5. runs the compose `loadtest` service against the gateway and checks its report (zero
#     failed requests, KV-capacity ratio = the checkpoint's KV bytes ratio within a block);
#  6. checks Prometheus scraped harp_*, vllm:* and gateway series from every target, and every
#     metric the Grafana dashboard queries;
#  7. kills vllm-harp's process: the container is restarted, the gateway marks it down then up;
#  8. `down`: nothing left running; the `models` volume keeps the prepared model and the plan.
#
# Run as root (rootful podman). Settings (environment):
#   COMPOSE_TEST_OUT       results folder [out/compose-test]
#   COMPOSE_TEST_TIMEOUT   whole run, seconds [3600; the first run builds the images]
#   COMPOSE_TEST_FRESH=1   delete the `models` volume first (prepare and plan from scratch)
#   COMPOSE_TEST_SEARCH=1  plan with the search (--kv-saving 0.27, 7-22 min here) instead of
#                          the committed layout (about 5 min); with COMPOSE_TEST_FRESH=1, or
#                          the volume's checkpoint is kept
#   COMPOSE_TEST_PROJECT   compose project name [harpct]
#   HARP_DATA_DIR          folder with wikitext-2-raw/ [the first shared/data above the repo]
#   HARP_LOADTEST_ARGS     load-test arguments [--quick --no-progress]
#   VLLM_CPU_KVCACHE_SPACE KV cache per server, GiB [1]
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPLOY=$ROOT/deploy
OUT=${COMPOSE_TEST_OUT:-$ROOT/out/compose-test}
P=${COMPOSE_TEST_PROJECT:-harpct}
TIMEOUT=${COMPOSE_TEST_TIMEOUT:-3600}
BASE_IMAGE=localhost/harp-base:bookworm-py311
PROM_IMAGE=localhost/harp-prometheus:debian
START=$(date +%s)
STEP="start"
FOLLOWERS=()

export CONTAINERS_CONF=$DEPLOY/podman/containers.conf
# The stack's settings: the 27% plan in place of HARP P = 8, the local images, ports away from
# a native stack's, 1 GiB of KV cache per server (both servers share 2 cores and the RAM).
# The plan: the layout `harp-vllm plan smollm2-135m --kv-saving 0.27` chose, from
# deploy/smollm2-plan27.layout (`--layout` skips the search, fits only those layers' maps).
PLAN_LAYOUT=$(grep -v '^#' "$DEPLOY/smollm2-plan27.layout" | tr -d '[:space:]')
SEARCH=${COMPOSE_TEST_SEARCH:-0}
export HARP_IMAGE=localhost/harp-vllm:cpu
export HARP_PROMETHEUS_IMAGE=$PROM_IMAGE
export HARP_MODEL=smollm2-135m
export HARP_PRUNE_COMMAND=plan
if [[ $SEARCH == 1 ]]; then export HARP_PRUNE_ARGS="--kv-saving 0.27"
else export HARP_PRUNE_ARGS="--layout $PLAN_LAYOUT"; fi
export HARP_PRUNED_NAME=smollm2-plan27
export HARP_AB_ALIAS="smollm2=dense:1,harp:1"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_CPU_OMP_THREADS_BIND=auto
export HARP_BIND_ADDRESS=127.0.0.1
export HARP_DENSE_PORT=28001 HARP_PRUNED_PORT=28002 HARP_GATEWAY_PORT=28080
export HARP_PROMETHEUS_PORT=29090 HARP_GRAFANA_PORT=23000
export HARP_LOADTEST_ARGS=${HARP_LOADTEST_ARGS:---quick --no-progress}
export HARP_LOADTEST_OUT=$OUT/loadtest
export HARP_GATEWAY_API_KEYS=""
GATEWAY=http://127.0.0.1:$HARP_GATEWAY_PORT
PROMETHEUS=http://127.0.0.1:$HARP_PROMETHEUS_PORT

# -- helpers ------------------------------------------------------------------------------------

elapsed() { local s=$(( $(date +%s) - START )); printf '%02d:%02d' $((s / 60)) $((s % 60)); }
left() { echo $(( TIMEOUT - ($(date +%s) - START) )); }
say() { echo "[$(elapsed)] $*"; }
step() { STEP=$1; echo; say "==> $1"; }
fail() {
    echo "[$(elapsed)] compose-test FAILED at step '$STEP': $*" >&2
    exit 1
}
trap 'fail "command failed (exit $?): $BASH_COMMAND"' ERR
trap 'echo "[$(elapsed)] compose-test interrupted at step '"'"'$STEP'"'"'" >&2; exit 130' INT TERM

# Bounded: every wait takes the smaller of its own limit and what is left of the whole run.
bound() { local l; l=$(left); (( l > 0 )) || fail "out of time (COMPOSE_TEST_TIMEOUT=$TIMEOUT s)"
          (( $1 < l )) && echo "$1" || echo "$l"; }

pc() {  # podman-compose on deploy/docker-compose.yml; its chatter goes to compose.log
    (cd "$DEPLOY" && podman-compose -p "$P" -f docker-compose.yml "$@") >>"$OUT/compose.log" 2>&1
}
ctr() { echo "${P}_$1_1"; }  # podman-compose 1.0.3 names containers project_service_N
logs_tail() { podman logs --tail "${2:-25}" "$(ctr "$1")" 2>&1 | sed 's/^/    | /' >&2 || true; }

follow() {  # a container's log into $OUT/<service>.log while it runs
    podman logs -f "$(ctr "$1")" >>"$OUT/$1.log" 2>&1 &
    FOLLOWERS+=($!)
}

wait_healthy() {  # service timeout: runs the compose health check itself (podman has no
    local svc=$1 c limit t0 status n=0  # systemd timer here to run it)
    c=$(ctr "$svc"); limit=$(bound "$2"); t0=$(date +%s)
    while :; do
        status=$(podman inspect -f '{{.State.Status}}' "$c" 2>/dev/null || echo missing)
        if [[ $status == running ]] && podman healthcheck run "$c" >/dev/null 2>&1; then
            say "$svc healthy after $(( $(date +%s) - t0 )) s"; return 0
        fi
        if [[ $status == exited || $status == missing ]] && \
           [[ $(podman inspect -f '{{.HostConfig.RestartPolicy.Name}}' "$c" 2>/dev/null) != unless-stopped ]]; then
            logs_tail "$svc"; fail "$svc is $status before it became healthy (log above)"
        fi
        if (( $(date +%s) - t0 >= limit )); then
            logs_tail "$svc"; fail "$svc not healthy within $limit s (state $status; log above)"
        fi
        (( n++ % 6 == 0 )) && say "  waiting for $svc ($status, $(( $(date +%s) - t0 )) s)"
        sleep 5
    done
}

wait_exit() {  # service timeout: a one-shot container's exit code must be 0
    local svc=$1 c limit t0 status last n=0
    c=$(ctr "$svc"); limit=$(bound "$2"); t0=$(date +%s)
    while :; do
        status=$(podman inspect -f '{{.State.Status}}' "$c" 2>/dev/null || echo missing)
        [[ $status == exited || $status == stopped ]] && break
        [[ $status == missing ]] && fail "$svc container $c does not exist"
        if (( $(date +%s) - t0 >= limit )); then
            logs_tail "$svc"; fail "$svc still running after $limit s (log above)"
        fi
        if (( n++ % 6 == 0 )); then
            last=$(tail -c 400 "$OUT/$svc.log" 2>/dev/null | tr '\r' '\n' | grep -av '^\s*$' \
                   | tail -n 1 | cut -c1-110 || true)
            say "  $svc running ($(( $(date +%s) - t0 )) s): $last"
        fi
        sleep 5
    done
    local code; code=$(podman inspect -f '{{.State.ExitCode}}' "$c")
    if [[ $code != 0 ]]; then logs_tail "$svc" 40; fail "$svc exited with code $code (log above)"; fi
    say "$svc finished in $(( $(date +%s) - t0 )) s"
}

volume_dir() { podman volume inspect -f '{{.Mountpoint}}' "${P}_$1"; }

# The image's VOLUME gives a container that mounts nothing there (the gateway) an anonymous
# volume, which `down` leaves behind with both compose tools: noted before each down, removed
# at the end.
ANON=()
collect_anon() {
    local c
    for c in $(podman ps -aq --filter "label=io.podman.compose.project=$P"); do
        ANON+=($(podman inspect -f '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}} {{end}}{{end}}' \
                 "$c" | tr ' ' '\n' | grep -v -e "^${P}_" -e '^$' || true))
    done
}
down() { collect_anon; pc down; }

cleanup() {
    local rc=$?
    trap - ERR
    set +e
    echo
    say "==> teardown"
    for pid in "${FOLLOWERS[@]}"; do kill "$pid" 2>/dev/null; done
    # -v: with the anonymous volume podman gave the one-off `run` container.
    podman rm -f -v "${P}_loadtest_run" >/dev/null 2>&1
    down
    (( ${#ANON[@]} )) && podman volume rm "${ANON[@]}" >/dev/null 2>&1
    # podman-compose 1.0.3's down leaves the project network (Docker Compose removes it).
    podman network rm "${P}_default" >/dev/null 2>&1
    # Prometheus' samples are this run's only; the models volume is the cache of the next run.
    podman volume rm "${P}_prometheus-data" >/dev/null 2>&1
    remaining=$(podman ps -a -q --filter "label=io.podman.compose.project=$P")
    if [[ -n $remaining ]]; then
        echo "teardown: containers still present: $remaining" >&2; rc=1
    else
        say "nothing left running (project $P); volume ${P}_models kept as the model cache"
    fi
    say "logs and results in $OUT"
    (( rc == 0 )) && say "compose-test passed in $(elapsed)"
    exit $rc
}

# -- 0. preflight -----------------------------------------------------------------------------

step "preflight"
mkdir -p "$OUT"
: >"$OUT/compose.log"
(( EUID == 0 )) || fail "run as root: the stack runs on rootful podman (sudo make compose-test)"
[[ -f $DEPLOY/.env ]] && fail "deploy/.env exists: podman-compose 1.0.3 lets .env override the \
environment this test sets; move it aside for the test"
if [[ -z ${HARP_DATA_DIR:-} ]]; then
    d=$ROOT
    while [[ $d != / && ! -d $d/shared/data ]]; do d=$(dirname "$d"); done
    HARP_DATA_DIR=$d/shared/data
fi
export HARP_DATA_DIR
[[ -f $HARP_DATA_DIR/wikitext-2-raw/wiki.test.raw ]] || fail "no wikitext-2-raw in \
HARP_DATA_DIR=$HARP_DATA_DIR (calibration and load-test text)"
for port in $HARP_DENSE_PORT $HARP_PRUNED_PORT $HARP_GATEWAY_PORT $HARP_PROMETHEUS_PORT; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        fail "port $port on 127.0.0.1 is in use (the test publishes the stack there)"
    fi
done
avail=$(df --output=avail -B1G /var/lib | tail -n 1 | tr -d ' ')
(( avail >= 20 )) || fail "only $avail GiB free under /var/lib (images and volumes need ~20)"
say "data $HARP_DATA_DIR, results $OUT, project $P, ${avail} GiB free, limit $TIMEOUT s"
say "plan: harp-vllm plan $HARP_MODEL $HARP_PRUNE_ARGS"

# -- 1. packages ------------------------------------------------------------------------------

step "Debian packages (podman, podman-compose, runc, debootstrap)"
missing=()
for pkg in podman podman-compose runc debootstrap; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
    say "installing ${missing[*]}"
    apt-get update -q >>"$OUT/apt.log" 2>&1 || fail "apt-get update failed (see $OUT/apt.log)"
    DEBIAN_FRONTEND=noninteractive timeout "$(bound 900)" apt-get install -y -q "${missing[@]}" \
        >>"$OUT/apt.log" 2>&1 || fail "apt-get install ${missing[*]} failed (see $OUT/apt.log)"
fi
say "$(podman --version), podman-compose $(dpkg-query -W -f '${Version}' podman-compose), \
runc $(dpkg-query -W -f '${Version}' runc)"

trap cleanup EXIT
if [[ ${COMPOSE_TEST_FRESH:-0} == 1 ]]; then
    down
    podman volume rm "${P}_models" >/dev/null 2>&1 && say "removed volume ${P}_models (fresh run)"
fi
down  # a stack left by an interrupted run

# -- 2. base image ------------------------------------------------------------------------------

step "local base image $BASE_IMAGE"
if podman image exists "$BASE_IMAGE"; then
    say "cached"
else
    rootfs=$(mktemp -d /var/tmp/harp-base.XXXXXX)
    say "debootstrap bookworm into $rootfs (a few minutes)"
    timeout "$(bound 1200)" debootstrap --variant=minbase \
        --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian >"$OUT/debootstrap.log" 2>&1 \
        || { rm -rf "$rootfs"; fail "debootstrap failed (see $OUT/debootstrap.log)"; }
    chroot "$rootfs" sh -c 'apt-get clean && rm -rf /var/lib/apt/lists/*'
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" \
        >>"$OUT/debootstrap.log" 2>&1
    rm -rf "$rootfs"
    say "built $BASE_IMAGE"
fi

# -- 3. images ----------------------------------------------------------------------------------

step "project image $HARP_IMAGE (docker/Dockerfile.cpu on the local base)"
# The image build uses the host's pip settings (local wheel folders and indexes, the CA bundle
# of a TLS-intercepting proxy), mounted read-only into the build.
mapfile -t pipargs < <(python3 - <<'EOF'
import configparser, os
cfg = {}
for f in ["/etc/pip.conf", "/etc/xdg/pip/pip.conf", os.path.expanduser("~/.config/pip/pip.conf"),
          os.path.expanduser("~/.pip/pip.conf")]:
    p = configparser.ConfigParser()
    p.read(f)
    if p.has_section("global"):
        cfg.update(p["global"])
for k in ("find-links", "extra-index-url", "index-url", "cert"):
    env = os.environ.get("PIP_" + k.upper().replace("-", "_"))
    if env:
        cfg[k] = env
out, mounts = [], set()
for k in ("find-links", "extra-index-url", "index-url", "cert"):
    if k not in cfg:
        continue
    val = " ".join(cfg[k].split())
    for item in val.split():
        path = item[len("file://"):] if item.startswith("file://") else item
        if path.startswith("/") and os.path.exists(path):
            if k == "extra-index-url" or k == "index-url":
                path = os.path.dirname(path.rstrip("/"))
            mounts.add(path)
    out += ["--build-arg", "PIP_" + k.upper().replace("-", "_") + "=" + val]
for m in sorted(mounts):
    out += ["-v", f"{m}:{m}:ro"]
print("\n".join(out))
EOF
)
say "pip settings passed to the build: ${pipargs[*]:-none}"
t0=$(date +%s)
timeout "$(bound 2400)" podman build --format docker --network=host -f docker/Dockerfile.cpu \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" "${pipargs[@]}" -t "$HARP_IMAGE" "$ROOT" \
    >"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log" >&2
                                 fail "image build failed (see $OUT/build.log)"; }
say "built in $(( $(date +%s) - t0 )) s ($(grep -c 'Using cache' "$OUT/build.log" || true) cached steps)"

step "Prometheus image $PROM_IMAGE (Debian's prometheus package)"
if podman image exists "$PROM_IMAGE"; then
    say "cached"
else
    timeout "$(bound 900)" podman build --format docker --network=host \
        -f "$DEPLOY/podman/Containerfile.prometheus" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -t "$PROM_IMAGE" "$DEPLOY/podman" >"$OUT/build-prometheus.log" 2>&1 \
        || fail "Prometheus image build failed (see $OUT/build-prometheus.log)"
    say "built"
fi
# No `podman image prune` here: podman keeps the build cache as untagged intermediate images,
# and pruning them makes the next build reinstall vLLM (about 6 minutes).

# -- 4. stack -----------------------------------------------------------------------------------

step "model-prep: SmolLM2 and the 27% plan into the models volume"
pc up -d --no-build model-prep || fail "podman-compose up model-prep failed (see $OUT/compose.log)"
follow model-prep
wait_exit model-prep 2400
models=$(volume_dir models)
ckpt=$models/$HARP_PRUNED_NAME
[[ -f $ckpt/config.json && -f $ckpt/plan.json ]] || fail "no checkpoint in $ckpt"
stamp=$(stat -c '%Y %s' "$ckpt/model.safetensors" "$ckpt/plan.json" | tr '\n' ' ')
got=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['layout'])" "$ckpt/plan.json")
say "checkpoint $HARP_PRUNED_NAME: $got"
if [[ $SEARCH != 1 && $got != "$PLAN_LAYOUT" ]]; then
    fail "the volume's $HARP_PRUNED_NAME has another layout than deploy/smollm2-plan27.layout \
(an older plan): rerun with COMPOSE_TEST_FRESH=1"
fi

step "restart: down, up again (the volume keeps the checkpoint; model-prep does not rebuild it)"
down
podman volume exists "${P}_models" || fail "down removed the models volume"
pc up -d --no-build model-prep
wait_exit model-prep 600
podman logs "$(ctr model-prep)" 2>&1 | grep -q "exists: not pruning again" \
    || { logs_tail model-prep; fail "model-prep did not find the checkpoint after the restart"; }
[[ $(stat -c '%Y %s' "$ckpt/model.safetensors" "$ckpt/plan.json" | tr '\n' ' ') == "$stamp" ]] \
    || fail "the checkpoint files changed across the restart"
say "checkpoint kept: $(podman logs "$(ctr model-prep)" 2>&1 | grep 'not pruning again')"

step "vllm-dense and vllm-harp"
pc up -d --no-build vllm-dense vllm-harp || fail "podman-compose up failed (see $OUT/compose.log)"
follow vllm-dense; follow vllm-harp
wait_healthy vllm-dense 900
wait_healthy vllm-harp 900

step "gateway and Prometheus (Grafana left out: no Grafana image here)"
pc up -d --no-build gateway prometheus || fail "podman-compose up failed (see $OUT/compose.log)"
follow gateway; follow prometheus
wait_healthy gateway 120
wait_healthy prometheus 120

# -- 5. load test -------------------------------------------------------------------------------

step "loadtest service against the gateway ($HARP_LOADTEST_ARGS)"
rm -rf "$HARP_LOADTEST_OUT"; mkdir -p "$HARP_LOADTEST_OUT"
chown 1000:1000 "$HARP_LOADTEST_OUT"  # the image's user writes the report
t0=$(date +%s)
(cd "$DEPLOY" && timeout "$(bound 1500)" podman-compose -p "$P" -f docker-compose.yml run \
    --no-deps -T --name "${P}_loadtest_run" loadtest) >"$OUT/loadtest.log" 2>&1 || true
code=$(podman inspect -f '{{.State.ExitCode}}' "${P}_loadtest_run" 2>/dev/null || echo none)
podman rm -f -v "${P}_loadtest_run" >/dev/null 2>&1 || true
if [[ $code != 0 ]]; then tail -n 30 "$OUT/loadtest.log" >&2
    fail "loadtest exited with $code (see $OUT/loadtest.log)"; fi
say "load test done in $(( $(date +%s) - t0 )) s: $HARP_LOADTEST_OUT/report.md"
python3 "$ROOT/scripts/compose_check.py" loadtest "$HARP_LOADTEST_OUT" "$ckpt/plan.json" \
    || fail "the load-test report does not hold"

# -- 6. Prometheus ------------------------------------------------------------------------------

step "Prometheus: targets, harp_* / vllm:* / gateway series, the dashboard's metrics"
sleep 6  # one scrape interval after the load
python3 "$ROOT/scripts/compose_check.py" prometheus "$PROMETHEUS" \
    "$DEPLOY/grafana/dashboards/harp-vllm.json" || fail "Prometheus checks failed"

# -- 7. a killed server -------------------------------------------------------------------------

step "kill vllm-harp's process: restarted by its policy; the gateway marks it down, then up"
c=$(ctr vllm-harp)
restarts=$(podman inspect -f '{{.RestartCount}}' "$c")
pid=$(podman inspect -f '{{.State.Pid}}' "$c")
kill -9 "$pid"
say "killed pid $pid (the API server, PID 1 of $c)"
python3 "$ROOT/scripts/compose_check.py" backend-up "$GATEWAY" harp 0 "$(bound 60)" \
    || fail "the gateway did not mark harp down"
for _ in $(seq 60); do
    (( $(podman inspect -f '{{.RestartCount}}' "$c") > restarts )) && break; sleep 1
done
(( $(podman inspect -f '{{.RestartCount}}' "$c") > restarts )) || fail "$c was not restarted"
say "$c restarted (restart count $(podman inspect -f '{{.RestartCount}}' "$c"))"
wait_healthy vllm-harp 600
python3 "$ROOT/scripts/compose_check.py" backend-up "$GATEWAY" harp 1 "$(bound 60)" \
    || fail "the gateway did not mark harp up again"

# -- 8. down ------------------------------------------------------------------------------------

step "down: no model data lost"
down
podman volume exists "${P}_models" || fail "down removed the models volume"
for d in "models/$HARP_MODEL" "$HARP_PRUNED_NAME" plan-stats; do
    [[ -e $models/$d ]] || fail "$d missing from the models volume after down"
done
say "models volume after down: $(du -sh "$models" | cut -f1) ($(ls "$models" | tr '\n' ' '))"
