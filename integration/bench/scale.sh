#!/usr/bin/env bash
# Scale benchmark: a catalog grown to 1,000, 10,000 and 100,000 instances in a
# real etcd, through the API, and what each size costs.
#
#   ./integration/bench/scale.sh [SIZES...]      (default: 1000 10000 100000)
#
# One etcd, one `signpost server` (API + its own DNS) and one `signpost dns`
# replica, all on this machine. Each step registers instances up to SIZE
# through the API, 32 in flight (service s<i/2>, instances i0 and i1, each
# with a tag and two meta keys), then, with the load stopped, prints one row:
#
#   reg/s        registrations per second over the last 10 % of the step
#   reg p50/p99  register latency (API answered) over that last 10 %
#   vis p50/p99  registration -> visible in the replica's DNS, 200 new
#                services one at a time (integration/src/bin/reg_latency.rs)
#   cold         a new replica: process start -> answering the last instance
#                (the whole catalog, read in pages at one revision)
#   srv/rep B/i  RSS above the empty process, per instance: server, the
#                replica that watched the whole load, and the cold one
#   qps          the replica (pinned to CPU 0, one UDP socket) under dnsperf
#                (CPU 1), the mix of dns.sh (90% A, 5% SRV, 5% NXDOMAIN) over
#                every service, median of 3 runs of 5 s
#   etcd db      etcd's database size (and in use)
#
# then the 100,000 / 1,000 ratios the issue sets goals on. Needs: etcd-server,
# dnsperf, bind9-dnsutils, curl. Takes about 10 minutes at the default sizes.
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZES=("${@:-1000 10000 100000}")
read -r -a SIZES <<<"${SIZES[*]}"
ZONE=xingren.host

for tool in etcd dnsperf taskset curl dig; do
    command -v $tool >/dev/null || { echo "missing $tool: apt-get install etcd-server dnsperf util-linux curl bind9-dnsutils" >&2; exit 1; }
done

TARGET=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --quiet -p signpost --bin signpost
cargo build --release --quiet -p signpost-integration --bin reg_latency --bin scale_load
BIN=$TARGET/release/signpost
LOAD=$TARGET/release/scale_load
WORK=$(mktemp -d /tmp/signpost-scale.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

. integration/bench/common.sh
bench_etcd scale 23379 --quota-backend-bytes $((4 * 1024 * 1024 * 1024))
bench_token
API=http://127.0.0.1:28600
"$BIN" server --etcd $ETCD --api 127.0.0.1:28600 --dns 127.0.0.1:28653 \
    --admin-token-file "$WORK/admin.token" >"$WORK/server.log" 2>&1 &
SRV_PID=$!
PIDS+=($SRV_PID)
for _ in $(seq 100); do curl -fsS $API/readyz >/dev/null 2>&1 && break; sleep 0.1; done
REP=127.0.0.1:26353
"$BIN" dns --etcd $ETCD --dns $REP --udp-sockets 1 >"$WORK/dns.log" 2>&1 &
REP_PID=$!
PIDS+=($REP_PID)
sleep 2

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
SRV_EMPTY=$(rss_kb $SRV_PID)
REP_EMPTY=$(rss_kb $REP_PID)
ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
per_inst() { awk -v r="$1" -v e="$2" -v n="$3" 'BEGIN { printf "%.0f", (r - e) * 1024 / n }'; }
echo "empty RSS: server $SRV_EMPTY KiB, replica $REP_EMPTY KiB"

HEAD='%8s %7s %15s %15s %8s %7s %7s %7s %8s %15s\n'
ROWS=()
row() { ROWS+=("$(printf "$HEAD" "$@")"); }
row instances reg/s "reg p50/p99 ms" "vis p50/p99 ms" "cold ms" "srv B/i" "rep B/i" "cold B/i" qps "etcd db MiB"

prev=0; extra=0
for N in "${SIZES[@]}"; do
    echo "registering $prev..$N"
    read -r rate rp50 rp99 _ < <("$LOAD" register $API "$TOKEN" $prev "$N" 32)
    prev=$N
    "$LOAD" wait $REP $((N - 1)) 60 >/dev/null
    sleep 2
    vis=$("$TARGET/release/reg_latency" $API $REP 200 "$TOKEN" "v$N-")
    vis=${vis%%$'\n'*}
    extra=$((extra + 200))
    vp50=$(echo "$vis" | sed -E 's/.*median ([0-9.]+) ms.*/\1/')
    vp99=$(echo "$vis" | sed -E 's/.*p99 ([0-9.]+) ms.*/\1/')
    total=$((N + extra))
    srv=$(per_inst "$(rss_kb $SRV_PID)" "$SRV_EMPTY" $total)
    rep=$(per_inst "$(rss_kb $REP_PID)" "$REP_EMPTY" $total)

    COLD=127.0.0.1:26354
    t0=$(ms)
    "$BIN" dns --etcd $ETCD --dns $COLD --udp-sockets 1 >"$WORK/cold.log" 2>&1 &
    COLD_PID=$!
    "$LOAD" wait $COLD $((N - 1)) 60 >/dev/null
    cold=$(( $(ms) - t0 ))
    sleep 1
    coldrss=$(per_inst "$(rss_kb $COLD_PID)" "$REP_EMPTY" $total)
    kill $COLD_PID; wait $COLD_PID 2>/dev/null || true

    QUERIES=$WORK/queries.txt
    SVCS=$((N / 2))
    awk -v n=$SVCS -v z=$ZONE 'BEGIN { for (i = 1; i <= 20000; i++) { s = (i * 7919) % n;
        m = i % 20; if (m == 0) print "s" s "." z " SRV"; else if (m == 1) print "nosuch" s "." z " A"; else print "s" s "." z " A" } }' >"$QUERIES"
    taskset -p -c 0 $REP_PID >/dev/null
    qs=()
    for _ in 1 2 3; do
        q=$(taskset -c 1 dnsperf -s 127.0.0.1 -p "${REP##*:}" -d "$QUERIES" -l 5 -c 20 -q 200 -t 2 2>&1 | awk '/Queries per second/ {print $4}')
        qs+=("${q%.*}")
    done
    taskset -p -c 0,1 $REP_PID >/dev/null
    qps=$(median "${qs[@]}")
    metrics=$(curl -fsS $ETCD/metrics)
    db=$(echo "$metrics" | awk '/^etcd_mvcc_db_total_size_in_bytes / {printf "%.0f", $2 / 1048576}')
    inuse=$(echo "$metrics" | awk '/^etcd_mvcc_db_total_size_in_use_in_bytes / {printf "%.0f", $2 / 1048576}')
    row "$N" "$rate" "$rp50/$rp99" "$vp50/$vp99" "$cold" "$srv" "$rep" "$coldrss" "$qps" "$db ($inuse)"
    eval "R_$N=\"$rate $vp99 $cold $qps $srv $rep\""
    echo "${ROWS[-1]}"
done

echo
printf '%s\n' "${ROWS[@]}"
first=${SIZES[0]}; last=${SIZES[-1]}
if [ "$first" != "$last" ]; then
    read -r r1 _ _ q1 _ _ <<<"$(eval echo \"\$R_$first\")"
    read -r r2 v2 c2 q2 s2 p2 <<<"$(eval echo \"\$R_$last\")"
    echo
    awk -v r1="$r1" -v r2="$r2" -v q1="$q1" -v q2="$q2" -v a="$first" -v b="$last" \
        'BEGIN { printf "at %d vs %d: registration rate %.2fx, DNS qps %.2fx\n", b, a, r2 / r1, q2 / q1 }'
    echo "at $last: visible p99 $v2 ms, cold start $c2 ms, server $s2 B/instance, replica $p2 B/instance"
fi
