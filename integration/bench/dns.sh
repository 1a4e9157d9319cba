#!/usr/bin/env bash
# DNS benchmark: Signpost (`signpost dns`, watching a real etcd) against Knot
# DNS serving the equivalent zone file, side by side in one run.
#
#   ./integration/bench/dns.sh [RUNS] [SECONDS]     (defaults: 3 runs of 10 s)
#
# 1000 services with 2 instances each are registered through the API; the
# same records are written as a zone file for Knot. dnsperf (pinned to CPU 1)
# sends a mix of 90% A, 5% SRV, 5% NXDOMAIN to each server (pinned to CPU 0),
# alternating, RUNS times. For each run it prints qps and the server's CPU
# time per answered query (from /proc/PID/stat), then the medians and ratios;
# then a fixed-rate run at 20k qps for lost queries; then registration ->
# answered, by the Signpost replica and by a second knotd that is a secondary
# of that replica (IXFR on its NOTIFY), over 200 and 50 new services.
# Needs: knot, dnsperf, etcd-server (apt-get install knot dnsperf etcd-server).
# PORT_OFFSET=N moves every port it listens on by N, for a machine where
# another benchmark holds them.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}
SECS=${2:-10}
N=1000
ZONE=xingren.host
OFF=${PORT_OFFSET:-0}

for tool in knotd dnsperf etcd taskset curl dig; do
    command -v $tool >/dev/null || { echo "missing $tool: apt-get install knot dnsperf etcd-server util-linux curl bind9-dnsutils" >&2; exit 1; }
done

# Honour CARGO_TARGET_DIR: several builds may share this machine.
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --quiet -p signpost --bin signpost
cargo build --release --quiet -p signpost-integration --bin reg_latency
BIN=$TARGET/release/signpost
WORK=$(mktemp -d /tmp/signpost-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

. integration/bench/common.sh
BENCH_PIN="taskset -c 1" bench_etcd bench $((22379 + OFF))
bench_token
API_ADDR=127.0.0.1:$((28500 + OFF))
API=http://$API_ADDR
taskset -c 1 "$BIN" server --etcd $ETCD --api $API_ADDR --dns 127.0.0.1:$((28053 + OFF)) \
    --admin-token-file "$WORK/admin.token" >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -fsS $API/readyz >/dev/null 2>&1 && break; sleep 0.1; done

SP_PORT=$((25353 + OFF))
KSEC_PORT=$((25355 + OFF))
taskset -c 0 "$BIN" dns --etcd $ETCD --dns 127.0.0.1:$SP_PORT --udp-sockets 1 \
    --allow-transfer 127.0.0.1/32 --notify 127.0.0.1:$KSEC_PORT >"$WORK/dns.log" 2>&1 &
SP_PID=$!
PIDS+=($SP_PID)

echo "registering $N services x 2 instances..."
ZONEFILE=$WORK/$ZONE.zone
{
    echo "\$ORIGIN $ZONE."
    echo "\$TTL 5"
    echo "@ SOA ns.$ZONE. hostmaster.$ZONE. 1 3600 600 86400 5"
    echo "@ NS ns.$ZONE."
    echo "ns A 127.0.0.1"
} >"$ZONEFILE"
for i in $(seq 1 $N); do
    a=$(( i / 250 )); b=$(( i % 250 ))
    for j in 1 2; do
        echo "svc$i i$j 10.$j.$a.$b"
    done
done | xargs -P 8 -n 3 sh -c 'curl -fsS -o /dev/null -X PUT -H "Authorization: Bearer '"$TOKEN"'" \
    -d "{\"address\":\"$2\",\"port\":8080}" '"$API"'/v1/services/$0/instances/$1'
for i in $(seq 1 $N); do
    a=$(( i / 250 )); b=$(( i % 250 ))
    for j in 1 2; do
        echo "svc$i A 10.$j.$a.$b"
        echo "svc$i SRV 10 100 8080 i$j.svc$i"
        echo "i$j.svc$i A 10.$j.$a.$b"
    done
done >>"$ZONEFILE"

# Query mix: 90% A, 5% SRV, 5% NXDOMAIN, over all services.
QUERIES=$WORK/queries.txt
for i in $(seq 1 20000); do
    s=$(( (i * 7919) % N + 1 ))
    case $(( i % 20 )) in
        0) echo "svc$s.$ZONE SRV" ;;
        1) echo "nosuch$s.$ZONE A" ;;
        *) echo "svc$s.$ZONE A" ;;
    esac
done >"$QUERIES"

KNOT_PORT=$((25354 + OFF))
mkdir -p "$WORK/knot"
cat >"$WORK/knot.conf" <<KNOT
server:
    listen: 127.0.0.1@$KNOT_PORT
    rundir: "$WORK/knot"
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$WORK/knot"
log:
  - target: stderr
    any: warning
zone:
  - domain: $ZONE
    file: "$ZONEFILE"
    journal-content: none
KNOT
taskset -c 0 knotd -c "$WORK/knot.conf" >"$WORK/knot.log" 2>&1 &
KNOT_PID=$!
PIDS+=($KNOT_PID)

# Knot as a secondary of the Signpost replica (as dns/tests/transfer.rs sets
# it up): it transfers the zone on the replica's NOTIFY, by IXFR after the
# first AXFR.
mkdir -p "$WORK/ksec/db" "$WORK/ksec/zones"
cat >"$WORK/ksec.conf" <<KNOT
server:
    listen: 127.0.0.1@$KSEC_PORT
    rundir: "$WORK/ksec"
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$WORK/ksec/db"
log:
  - target: "$WORK/ksec.log"
    any: info
remote:
  - id: signpost
    address: 127.0.0.1@$SP_PORT
acl:
  - id: from_signpost
    address: 127.0.0.1
    action: notify
template:
  - id: default
    storage: "$WORK/ksec/zones"
    zonefile-sync: -1
    zonefile-load: none
    journal-content: all
zone:
  - domain: $ZONE
    master: signpost
    acl: from_signpost
KNOT
taskset -c 1 knotd -c "$WORK/ksec.conf" >/dev/null 2>&1 &
PIDS+=($!)

# Wait until all three answer the last service.
for port in $SP_PORT $KNOT_PORT $KSEC_PORT; do
    for _ in $(seq 100); do
        [ -n "$(dig @127.0.0.1 -p $port svc$N.$ZONE A +short +time=1 +tries=1 2>/dev/null)" ] && break
        sleep 0.2
    done
done
echo "signpost: $(dig @127.0.0.1 -p $SP_PORT svc1.$ZONE A +short | tr '\n' ' ')  knot: $(dig @127.0.0.1 -p $KNOT_PORT svc1.$ZONE A +short | tr '\n' ' ')"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

# bench NAME PORT PID -> prints "qps usec_per_query lost"
bench() {
    local port=$2 pid=$3 before after out
    before=$(cpu_ticks "$pid")
    out=$(taskset -c 1 dnsperf -s 127.0.0.1 -p "$port" -d "$QUERIES" -l "$SECS" -c 20 -q 200 -t 2 2>&1)
    after=$(cpu_ticks "$pid")
    local qps completed lost
    qps=$(echo "$out" | awk '/Queries per second/ {print $4}')
    completed=$(echo "$out" | awk '/Queries completed/ {print $3}')
    lost=$(echo "$out" | awk '/Queries lost/ {print $3}')
    awk -v q="$qps" -v c="$completed" -v t=$((after - before)) -v hz="$TICK" -v l="$lost" \
        'BEGIN { printf "%.0f %.2f %d\n", q, (t / hz) * 1e6 / c, l }'
}

echo
printf '%-4s %-9s %10s %14s %6s\n' run server qps "cpu µs/query" lost
SP_QPS=(); SP_CPU=(); KN_QPS=(); KN_CPU=()
for r in $(seq 1 "$RUNS"); do
    read -r q c l < <(bench signpost $SP_PORT $SP_PID); SP_QPS+=("$q"); SP_CPU+=("$c")
    printf '%-4s %-9s %10s %14s %6s\n' "$r" signpost "$q" "$c" "$l"
    read -r q c l < <(bench knot $KNOT_PORT $KNOT_PID); KN_QPS+=("$q"); KN_CPU+=("$c")
    printf '%-4s %-9s %10s %14s %6s\n' "$r" knot "$q" "$c" "$l"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
SPQ=$(median "${SP_QPS[@]}"); KNQ=$(median "${KN_QPS[@]}")
SPC=$(median "${SP_CPU[@]}"); KNC=$(median "${KN_CPU[@]}")
echo
echo "median qps:          signpost $SPQ   knot $KNQ   ratio signpost/knot $(awk -v a="$SPQ" -v b="$KNQ" 'BEGIN{printf "%.2f", a/b}')"
echo "median cpu µs/query: signpost $SPC   knot $KNC   ratio signpost/knot $(awk -v a="$SPC" -v b="$KNC" 'BEGIN{printf "%.2f", a/b}')"

echo
echo "fixed rate 20000 qps for $SECS s:"
for s in "signpost $SP_PORT" "knot $KNOT_PORT"; do
    set -- $s
    out=$(taskset -c 1 dnsperf -s 127.0.0.1 -p "$2" -d "$QUERIES" -l "$SECS" -c 20 -Q 20000 -t 2 2>&1)
    echo "  $1: $(echo "$out" | grep -E 'Queries (sent|lost)' | tr -s ' ' | tr '\n' ' ')"
done

echo
echo "registration -> visible in DNS (API on the server, DNS on the signpost dns replica):"
"$TARGET/release/reg_latency" "$API" "127.0.0.1:$SP_PORT" 200 "$TOKEN"

# Start from a secondary in step with the replica (the registrations above
# are still being transferred): the same SOA serial, within 10 s.
serial() { dig @127.0.0.1 -p "$1" $ZONE SOA +short +time=1 +tries=1 | awk '{print $3}'; }
for _ in $(seq 100); do
    [ "$(serial $KSEC_PORT)" = "$(serial $SP_PORT)" ] && break
    sleep 0.1
done
echo
echo "registration -> answered by the Knot secondary of the replica (NOTIFY, then IXFR):"
"$TARGET/release/reg_latency" "$API" "127.0.0.1:$KSEC_PORT" 50 "$TOKEN" sec
echo "  knot secondary transfers: $(grep -c 'IXFR, incoming.*finished' "$WORK/ksec.log") IXFR, $(grep -c 'AXFR, incoming.*finished' "$WORK/ksec.log") AXFR"
