#!/usr/bin/env bash
# Health-check benchmark: many checked instances at a 10 s interval, probed
# by one control plane and then shared by two.
#
#   ./integration/bench/checks.sh [INSTANCES] [SECONDS]   (default: 10000, 30)
#
# nginx answers the checks (`/health`, 200) on loopback. INSTANCES are
# registered through the API with an HTTP check every 10 s: 10,000 of them
# are 1,000 probes a second. After 15 s (the first round, which new
# instances get at once), it measures for SECONDS: probes run and failed
# (each server's signpost_health_probes_total), probes per second, and the
# servers' CPU (from /proc). Then a second server joins, takes its share of
# the check shards through etcd, and the same is measured for both.
# Needs: etcd-server, nginx-light, curl.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-10000}
SECS=${2:-30}

for tool in etcd nginx curl; do
    command -v $tool >/dev/null || { echo "missing $tool: apt-get install etcd-server nginx-light curl" >&2; exit 1; }
done

TARGET=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --quiet -p signpost --bin signpost
cargo build --release --quiet -p signpost-integration --bin scale_load
BIN=$TARGET/release/signpost
WORK=$(mktemp -d /tmp/signpost-checks.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

. integration/bench/common.sh
bench_etcd checks 23479

APP_PORT=28880
cat >"$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 4096; }
http {
    access_log off;
    server {
        listen 127.0.0.1:$APP_PORT;
        location /health { return 200 "ok\n"; }
    }
}
NGINX
nginx -c "$WORK/nginx.conf" -p "$WORK"
for _ in $(seq 50); do curl -fsS http://127.0.0.1:$APP_PORT/health >/dev/null 2>&1 && break; sleep 0.1; done

bench_token
start_server() { # name api-port dns-port
    "$BIN" server --etcd $ETCD --api 127.0.0.1:$2 --dns 127.0.0.1:$3 \
        --admin-token-file "$WORK/admin.token" >"$WORK/$1.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$1=$!"
    for _ in $(seq 100); do curl -fsS http://127.0.0.1:$2/readyz >/dev/null 2>&1 && break; sleep 0.1; done
}
start_server a 28700 28753
echo "registering $N checked instances..."
"$TARGET/release/scale_load" register http://127.0.0.1:28700 "$TOKEN" 0 "$N" 32 $APP_PORT >/dev/null

metric() { # api-port name-with-labels
    curl -fsS "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m {print $2; f=1} END {if (!f) print 0}'
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

# measure "name port pid" ... -> one line per server, then the sum
measure() {
    local specs=("$@") before=() after=() fails=() cpu=()
    for s in "${specs[@]}"; do
        set -- $s
        before+=("$(metric "$2" 'signpost_health_probes_total{result="pass"}') $(metric "$2" 'signpost_health_probes_total{result="fail"}') $(cpu_ticks "$3")")
    done
    sleep "$SECS"
    local total=0 i=0
    for s in "${specs[@]}"; do
        set -- $s
        read -r p0 f0 c0 <<<"${before[$i]}"
        p1=$(metric "$2" 'signpost_health_probes_total{result="pass"}')
        f1=$(metric "$2" 'signpost_health_probes_total{result="fail"}')
        c1=$(cpu_ticks "$3")
        shards=$(metric "$2" signpost_health_shards_held)
        checks=$(metric "$2" signpost_health_checks)
        awk -v n="$1" -v p=$((p1 - p0)) -v f=$((f1 - f0)) -v c=$((c1 - c0)) -v s="$SECS" -v hz="$TICK" -v sh="$shards" -v ch="$checks" \
            'BEGIN { printf "  %-8s shards %2d  checks %6d  probes/s %7.1f  failed %d  CPU %5.1f %%\n", n, sh, ch, p / s, f, 100 * c / hz / s }'
        total=$((total + p1 - p0 + f1 - f0))
        i=$((i + 1))
    done
    awk -v t=$total -v s="$SECS" 'BEGIN { printf "  all      probes/s %.1f\n", t / s }'
}

sleep 15
echo "one control plane, $N instances every 10 s, over $SECS s:"
measure "server-a 28700 $PID_a"

start_server b 28701 28754
for _ in $(seq 100); do
    a=$(metric 28700 signpost_health_shards_held); b=$(metric 28701 signpost_health_shards_held)
    [ "$b" -gt 0 ] && [ $((a + b)) -eq 32 ] && break
    sleep 0.2
done
sleep 12
echo "two control planes, over $SECS s:"
measure "server-a 28700 $PID_a" "server-b 28701 $PID_b"
