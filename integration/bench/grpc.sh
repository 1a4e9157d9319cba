#!/usr/bin/env bash
# gRPC benchmark: the same tonic client and server, two ways, side by side:
#   direct    grpc-call -> grpc-echo (h2c)
#   mesh      grpc-call -> sidecar A (outbound, h2c) == mTLS, HTTP/2 ==> sidecar B (inbound) -> grpc-echo (h2c)
# Open loop at a fixed rate of unary calls (latency counted from each call's
# scheduled time, so a stall is not hidden), alternating the paths RUNS times
# and printing medians of p50 and p99 and the mesh's cost over direct; then
# the sidecars' RSS after the load, and a 1 GiB server stream through the
# mesh with each sidecar's peak RSS (VmHWM) during it.
# Servers (grpc-echo, both sidecars, the control plane) are pinned to CPU 0,
# the client to CPU 1.
#
#   ./integration/bench/grpc.sh [RUNS] [RATE] [SECONDS]   (defaults: 5 2000 10)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-5}
RATE=${2:-2000}
SECS=${3:-10}
for tool in taskset curl; do
    command -v $tool >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
[ -n "${SIGNPOST_BENCH_NO_BUILD:-}" ] ||
    cargo build --release --quiet -p signpost --bin signpost -p signpost-examples --bin grpc-echo --bin grpc-call
BIN=$PWD/target/release
WORK=$(mktemp -d /tmp/signpost-grpc-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

taskset -c 0 "$BIN/grpc-echo" --listen 127.0.0.1:29090 --id e1 >"$WORK/echo.log" 2>&1 &
PIDS+=($!)
taskset -c 0 "$BIN/signpost" server --dev --api 127.0.0.1:29500 --dns 127.0.0.1:29053 --udp-sockets 1 >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -fsS http://127.0.0.1:29500/readyz >/dev/null 2>&1 && break; sleep 0.1; done
RUST_LOG=warn taskset -c 0 "$BIN/signpost" sidecar --service echo --id b1 --address 127.0.0.1 --app 127.0.0.1:29090 \
    --inbound 127.0.0.1:29006 --outbound 127.0.0.1:29101 --admin 127.0.0.1:29100 \
    --control-plane http://127.0.0.1:29500 --dns 127.0.0.1:29053 >"$WORK/sidecar-b.log" 2>&1 &
SIDECAR_B=$!; PIDS+=($SIDECAR_B)
RUST_LOG=warn taskset -c 0 "$BIN/signpost" sidecar --service client --id a1 --address 127.0.0.2 --app 127.0.0.1:29091 \
    --inbound 127.0.0.2:29006 --outbound 127.0.0.1:29001 --admin 127.0.0.1:29000 \
    --control-plane http://127.0.0.1:29500 --dns 127.0.0.1:29053 >"$WORK/sidecar-a.log" 2>&1 &
SIDECAR_A=$!; PIDS+=($SIDECAR_A)
for port in 29000 29100; do
    for _ in $(seq 200); do curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break; sleep 0.1; done
done
CALL=(taskset -c 1 "$BIN/grpc-call")
MESH=(--target 127.0.0.1:29001 --authority echo.xingren.host)
DIRECT=(--target 127.0.0.1:29090)
for _ in $(seq 50); do "${CALL[@]}" "${MESH[@]}" unary >/dev/null 2>&1 && break; sleep 0.2; done
"${CALL[@]}" "${MESH[@]}" unary >/dev/null || { echo "the mesh does not answer" >&2; tail "$WORK"/*.log >&2; exit 1; }

rss_mb() { awk -v k="$2" '$1 == k":" {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : a[NR/2]}'; }
field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k {print $2}'; }

declare -A P50 P99 ERR
echo "open loop: $RATE unary calls/s for ${SECS}s, $RUNS runs per path, alternating"
for run in $(seq "$RUNS"); do
    for path in direct mesh; do
        if [ $path = direct ]; then target=("${DIRECT[@]}"); else target=("${MESH[@]}"); fi
        line=$("${CALL[@]}" "${target[@]}" bench --rate "$RATE" --duration "${SECS}s" || true)
        echo "run $run $path: $line"
        P50[$path]+="$(field "$line" p50_ms) "
        P99[$path]+="$(field "$line" p99_ms) "
        ERR[$path]+="$(field "$line" errors) "
    done
done
for path in direct mesh; do
    echo "median $path: p50 $(median ${P50[$path]}) ms, p99 $(median ${P99[$path]}) ms (errors per run: ${ERR[$path]})"
done
awk -v a="$(median ${P50[mesh]})" -v b="$(median ${P50[direct]})" -v c="$(median ${P99[mesh]})" -v d="$(median ${P99[direct]})" \
    'BEGIN {printf "mesh adds: p50 %+.2f ms, p99 %+.2f ms (medians)\n", a - b, c - d}'
echo "sidecar RSS after the load: A $(rss_mb $SIDECAR_A VmRSS) MB, B $(rss_mb $SIDECAR_B VmRSS) MB (peak so far: A $(rss_mb $SIDECAR_A VmHWM) MB, B $(rss_mb $SIDECAR_B VmHWM) MB)"

# A 1 GiB server stream: 1024 messages of 1 MiB, through the mesh.
before_a=$(rss_mb $SIDECAR_A VmHWM); before_b=$(rss_mb $SIDECAR_B VmHWM)
line=$("${CALL[@]}" "${MESH[@]}" --timeout 300s stream --count 1024 --size 1048576)
echo "1 GiB server stream through the mesh: $line"
echo "sidecar peak RSS (VmHWM): A $before_a -> $(rss_mb $SIDECAR_A VmHWM) MB, B $before_b -> $(rss_mb $SIDECAR_B VmHWM) MB"
