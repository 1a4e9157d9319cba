#!/usr/bin/env bash
# The Signpost demo: builds, starts etcd and `signpost server`, registers
# services and shows them. Ctrl-C (or the end, with --non-interactive) stops
# everything it started.
#   ./examples/demo.sh                    # walk through, then wait for Ctrl-C
#   ./examples/demo.sh --non-interactive  # run the steps, exit with a status
set -euo pipefail
cd "$(dirname "$0")/.."

INTERACTIVE=1
[ "${1:-}" = "--non-interactive" ] && INTERACTIVE=0

. integration/deps.sh
signpost_install_deps

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

WORK=$(mktemp -d /tmp/signpost-demo.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "Building signpost (cargo build --release)"
cargo build --release --quiet --bin signpost
SIGNPOST=$PWD/target/release/signpost
export SIGNPOST_ADDR=http://127.0.0.1:18500

ETCD_CLIENT=http://127.0.0.1:12379
step "Starting etcd on $ETCD_CLIENT (data in $WORK/etcd)"
MODE=etcd
if command -v etcd >/dev/null 2>&1; then
    etcd --name demo --data-dir "$WORK/etcd" \
        --listen-client-urls "$ETCD_CLIENT" --advertise-client-urls "$ETCD_CLIENT" \
        --listen-peer-urls http://127.0.0.1:12380 --initial-advertise-peer-urls http://127.0.0.1:12380 \
        --initial-cluster demo=http://127.0.0.1:12380 >"$WORK/etcd.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do
        curl -fsS "$ETCD_CLIENT/health" >/dev/null 2>&1 && break
        sleep 0.2
    done
    curl -fsS "$ETCD_CLIENT/health" >/dev/null 2>&1 || MODE=dev
else
    MODE=dev
fi

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/admin.token"
if [ "$MODE" = etcd ]; then
    step "Starting signpost server against etcd"
    "$SIGNPOST" server --etcd "$ETCD_CLIENT" --api 127.0.0.1:18500 \
        --admin-token-file "$WORK/admin.token" >"$WORK/server.log" 2>&1 &
    export SIGNPOST_TOKEN=$(cat "$WORK/admin.token")
else
    step "etcd could not start here: falling back to signpost server --dev (in-memory store)"
    "$SIGNPOST" server --dev --api 127.0.0.1:18500 >"$WORK/server.log" 2>&1 &
fi
PIDS+=($!)
for _ in $(seq 50); do
    curl -fsS "$SIGNPOST_ADDR/readyz" >/dev/null 2>&1 && break
    sleep 0.2
done
curl -fsS "$SIGNPOST_ADDR/readyz" >/dev/null || { cat "$WORK/server.log"; exit 1; }

step "Registering two user instances and one order instance"
run "$SIGNPOST" register user --id u1 --address 127.0.0.11 --port 8080 --tag v1
run "$SIGNPOST" register user --id u2 --address 127.0.0.12 --port 8080 --tag v2 --ttl 30s
run "$SIGNPOST" register order --id o1 --address 127.0.0.21 --port 8080

step "Every service with healthy/total instances"
run "$SIGNPOST" services

step "The user instances"
run "$SIGNPOST" instances user

step "Bad input gets a clear error (and changes nothing)"
if "$SIGNPOST" register user --id bad_id --address 127.0.0.1 --port 80; then
    echo "expected a refusal" >&2; exit 1
fi

step "Deregistering u2"
run "$SIGNPOST" deregister user u2
run "$SIGNPOST" instances user

echo
echo "Try it by hand:  export SIGNPOST_ADDR=$SIGNPOST_ADDR${SIGNPOST_TOKEN:+ SIGNPOST_TOKEN=$SIGNPOST_TOKEN}"
echo "                 $SIGNPOST services; curl $SIGNPOST_ADDR/v1/services/user"
if [ "$INTERACTIVE" = 1 ]; then
    echo "Press Ctrl-C to stop everything the demo started."
    wait
fi
echo "demo finished"
