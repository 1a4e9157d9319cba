#!/usr/bin/env bash
# Sidecar benchmark: one request path measured four ways, side by side:
#   direct      wrk -> nginx
#   signpost    wrk -> sidecar A (outbound) == mTLS, HTTP/2 ==> sidecar B (inbound) -> nginx
#   threads2    the same with two sidecars run with --threads 2 (a multi-threaded
#               runtime), also on CPU 0: the cost of the threads, not a gain from
#               a second CPU, which this two-CPU machine gives wrk
#   haproxy     wrk -> haproxy A == mTLS, HTTP/2 ==> haproxy B -> nginx
#   floor       wrk -> relay A == mTLS, HTTP/2 ==> relay B -> nginx, where the relays
#               (integration/bench/floor.rs) are the sidecar's libraries alone:
#               hyper, h2, rustls, tokio, and none of Signpost's features
# Every server is pinned to CPU 0, wrk to CPU 1. Prints req/s, latency
# percentiles and each proxy's CPU time per request (from /proc/PID/stat)
# per path (median of RUNS runs), the sidecars' RSS under load,
# and, when `oha` is installed (cargo install oha), open-loop latency at a
# fixed 5000 req/s with latency correction (median of RUNS runs per chain).
#
#   ./integration/bench/sidecar.sh [RUNS] [SECONDS] [CONNECTIONS]   (defaults: 3 10 32)
# Needs: nginx, haproxy, wrk, openssl (apt-get install nginx-light haproxy wrk openssl).
#
# With SIGNPOST_BENCH_CALLGRIND=N it instead runs both sidecars and both
# HAProxies (and both floor relays) under valgrind's callgrind, sends N
# requests through each chain
# (oha, 32 connections, after 300 to warm up) and prints the instructions
# each proxy executed per request: user space only (TLS included), but
# repeatable to a few per cent on a noisy machine where CPU times are not
# (apt-get install valgrind). SIGNPOST_BENCH_KEEP=DIR also keeps the profiles
# as DIR/callgrind.{sidecar,haproxy,floor}.{A,B}.out for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}
SECS=${2:-10}
CONNS=${3:-32}
for tool in nginx haproxy wrk openssl taskset curl; do
    command -v $tool >/dev/null || { echo "missing $tool: apt-get install nginx-light haproxy wrk openssl" >&2; exit 1; }
done

CALLGRIND=${SIGNPOST_BENCH_CALLGRIND:-}
WRAP=()
if [ -n "$CALLGRIND" ]; then
    for tool in valgrind callgrind_control oha; do
        command -v $tool >/dev/null || { echo "missing $tool: apt-get install valgrind; cargo install oha" >&2; exit 1; }
    done
fi

[ -n "${SIGNPOST_BENCH_NO_BUILD:-}" ] ||
    cargo build --release --quiet -p signpost --bin signpost -p signpost-integration --bin signpost-bench-floor
BIN=$PWD/target/release/signpost
FLOOR=$PWD/target/release/signpost-bench-floor
WORK=$(mktemp -d /tmp/signpost-sidecar-bench.XXXXXX)
PIDS=()
[ -z "$CALLGRIND" ] || WRAP=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.%p.out")
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# --- nginx: the app -----------------------------------------------------------
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx;
    proxy_temp_path $WORK/nginx;
    fastcgi_temp_path $WORK/nginx;
    uwsgi_temp_path $WORK/nginx;
    scgi_temp_path $WORK/nginx;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:28080;
        location / { return 200 "hello from nginx\n"; }
    }
}
NGINX
taskset -c 0 nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

# --- Signpost: control plane (dev), two sidecars ----------------------------
taskset -c 0 "$BIN" server --dev --api 127.0.0.1:28500 --dns 127.0.0.1:28053 --udp-sockets 1 >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -fsS http://127.0.0.1:28500/readyz >/dev/null 2>&1 && break; sleep 0.1; done
RUST_LOG=warn taskset -c 0 "${WRAP[@]}" "$BIN" sidecar --service app --id b1 --address 127.0.0.1 --app 127.0.0.1:28080 \
    --inbound 127.0.0.1:28006 --outbound 127.0.0.1:28101 --admin 127.0.0.1:28100 \
    --control-plane http://127.0.0.1:28500 --dns 127.0.0.1:28053 >"$WORK/sidecar-b.log" 2>&1 &
SIDECAR_B=$!; PIDS+=($SIDECAR_B)
RUST_LOG=warn taskset -c 0 "${WRAP[@]}" "$BIN" sidecar --service client --id a1 --address 127.0.0.2 --app 127.0.0.1:28081 \
    --inbound 127.0.0.2:28006 --outbound 127.0.0.1:28001 --admin 127.0.0.1:28000 \
    --control-plane http://127.0.0.1:28500 --dns 127.0.0.1:28053 >"$WORK/sidecar-a.log" 2>&1 &
SIDECAR_A=$!; PIDS+=($SIDECAR_A)
# The same chain on sidecars with two worker threads: service app2 (B2)
# called through client2 (A2).
RUST_LOG=warn taskset -c 0 "${WRAP[@]}" "$BIN" sidecar --threads 2 --service app2 --id b2 --address 127.0.0.3 --app 127.0.0.1:28080 \
    --inbound 127.0.0.3:28006 --outbound 127.0.0.1:28201 --admin 127.0.0.1:28200 \
    --control-plane http://127.0.0.1:28500 --dns 127.0.0.1:28053 >"$WORK/sidecar-b2.log" 2>&1 &
SIDECAR_B2=$!; PIDS+=($SIDECAR_B2)
RUST_LOG=warn taskset -c 0 "${WRAP[@]}" "$BIN" sidecar --threads 2 --service client2 --id a2 --address 127.0.0.4 --app 127.0.0.1:28081 \
    --inbound 127.0.0.4:28006 --outbound 127.0.0.1:28301 --admin 127.0.0.1:28300 \
    --control-plane http://127.0.0.1:28500 --dns 127.0.0.1:28053 >"$WORK/sidecar-a2.log" 2>&1 &
SIDECAR_A2=$!; PIDS+=($SIDECAR_A2)
for port in 28000 28100 28200 28300; do
    # Up to a minute: under valgrind, start-up is slow.
    for _ in $(seq 600); do curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break; sleep 0.1; done
done
curl -fsS -H 'Host: app' http://127.0.0.1:28001/ >/dev/null || { echo "signpost chain does not answer" >&2; tail "$WORK"/sidecar-*.log >&2; exit 1; }
curl -fsS -H 'Host: app2' http://127.0.0.1:28301/ >/dev/null || { echo "signpost --threads 2 chain does not answer" >&2; tail "$WORK"/sidecar-*.log >&2; exit 1; }


# --- HAProxy: the same chain with mTLS ----------------------------------------
cd "$WORK"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
    -keyout ca.key -out ca.pem 2>/dev/null
for who in a b; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who" \
        -keyout "$who.key" -out "$who.csr" 2>/dev/null
    printf 'subjectAltName=DNS:%s,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' "$who" >"$who.ext"
    openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile "$who.ext" -out "$who.crt" 2>/dev/null
    cat "$who.crt" "$who.key" >"$who.pem"
done
cd - >/dev/null
cat >"$WORK/haproxy-b.cfg" <<CFG
global
    nbthread 1
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend mtls_in
    bind 127.0.0.1:29443 ssl crt $WORK/b.pem ca-file $WORK/ca.pem verify required ssl-min-ver TLSv1.3 alpn h2,http/1.1
    default_backend app
backend app
    http-reuse always
    server nginx 127.0.0.1:28080
CFG
cat >"$WORK/haproxy-a.cfg" <<CFG
global
    nbthread 1
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend plain_in
    bind 127.0.0.1:29001
    default_backend peer
backend peer
    http-reuse always
    server b 127.0.0.1:29443 ssl crt $WORK/a.pem ca-file $WORK/ca.pem verify required ssl-min-ver TLSv1.3 alpn h2
CFG
taskset -c 0 "${WRAP[@]}" haproxy -f "$WORK/haproxy-b.cfg" -db >"$WORK/haproxy-b.log" 2>&1 &
HAPROXY_B=$!; PIDS+=($HAPROXY_B)
taskset -c 0 "${WRAP[@]}" haproxy -f "$WORK/haproxy-a.cfg" -db >"$WORK/haproxy-a.log" 2>&1 &
HAPROXY_A=$!; PIDS+=($HAPROXY_A)
for _ in $(seq 300); do curl -fsS http://127.0.0.1:29001/ >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS http://127.0.0.1:29001/ >/dev/null || { echo "haproxy chain does not answer" >&2; cat "$WORK"/haproxy-*.log >&2; exit 1; }

# --- The floor: the same chain on the sidecar's libraries alone ---------------
taskset -c 0 "${WRAP[@]}" "$FLOOR" inbound 127.0.0.1:29543 127.0.0.1:28080 "$WORK/ca.pem" "$WORK/b.crt" "$WORK/b.key" \
    >"$WORK/floor-b.log" 2>&1 &
FLOOR_B=$!; PIDS+=($FLOOR_B)
for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/29543) 2>/dev/null && break; sleep 0.2; done
taskset -c 0 "${WRAP[@]}" "$FLOOR" outbound 127.0.0.1:29101 127.0.0.1:29543 "$WORK/ca.pem" "$WORK/a.crt" "$WORK/a.key" \
    >"$WORK/floor-a.log" 2>&1 &
FLOOR_A=$!; PIDS+=($FLOOR_A)
for _ in $(seq 300); do curl -fsS -H 'Host: app' http://127.0.0.1:29101/ >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS -H 'Host: app' http://127.0.0.1:29101/ >/dev/null || { echo "floor chain does not answer" >&2; cat "$WORK"/floor-*.log >&2; exit 1; }

if [ -n "$CALLGRIND" ]; then
    # instructions NAME PID_A PID_B URL [Host]: N requests through one chain,
    # counted in both of its proxies.
    instructions() {
        local name=$1 a=$2 b=$3 url=$4 hdr=() pid side ir
        [ -n "${5:-}" ] && hdr=(-H "Host: $5")
        for pid in $a $b; do callgrind_control -i on "$pid" >/dev/null 2>&1; done
        oha --no-tui -n 300 -c 32 "${hdr[@]}" "$url" >/dev/null
        for pid in $a $b; do callgrind_control -z "$pid" >/dev/null 2>&1; done
        oha --no-tui -n "$CALLGRIND" -c 32 "${hdr[@]}" "$url" | grep -E 'Success rate|\[[0-9]{3}\] [0-9]+ responses'
        for pid in $a $b; do callgrind_control -d "$pid" >/dev/null 2>&1; done
        sleep 1
        for side in A B; do
            pid=$a; [ $side = B ] && pid=$b
            ir=$(grep -h '^summary:' "$WORK/callgrind.$pid.out".* | tail -1 | awk '{print $2}')
            echo "$name $side: $((ir / CALLGRIND)) instructions per request ($ir over $CALLGRIND requests)"
            if [ -n "${SIGNPOST_BENCH_KEEP:-}" ]; then
                mkdir -p "$SIGNPOST_BENCH_KEEP"
                cp "$(ls "$WORK/callgrind.$pid.out".* | sort -V | tail -1)" "$SIGNPOST_BENCH_KEEP/callgrind.$name.$side.out"
            fi
        done
    }
    instructions sidecar "$SIDECAR_A" "$SIDECAR_B" http://127.0.0.1:28001/ app
    instructions threads2 "$SIDECAR_A2" "$SIDECAR_B2" http://127.0.0.1:28301/ app2
    instructions haproxy "$HAPROXY_A" "$HAPROXY_B" http://127.0.0.1:29001/
    instructions floor "$FLOOR_A" "$FLOOR_B" http://127.0.0.1:29101/ app
    exit 0
fi

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

# run NAME URL [Host] [PIDS] -> "req/s p50 p99 cpu" (ms; cpu = µs of CPU per
# request of each of PIDS, joined by /)
run() {
    local out hdr=()
    [ -n "${3:-}" ] && hdr=(-H "Host: $3")
    local before=() after=() pid
    for pid in ${4:-}; do before+=("$(cpu_ticks "$pid")"); done
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "${hdr[@]}" "$2")
    for pid in ${4:-}; do after+=("$(cpu_ticks "$pid")"); done
    local rps p50 p99 reqs cpu=""
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    # CPU (user+system) per request of each proxy, in µs.
    local i
    for i in "${!before[@]}"; do
        cpu+="$(awk -v a="${before[$i]}" -v b="${after[$i]}" -v n="$reqs" -v hz="$(getconf CLK_TCK)" \
            'BEGIN {printf "%.0f", (b - a) / hz / n * 1e6}')/"
    done
    # wrk prints 653.00us / 3.71ms / 1.02s: normalise to ms.
    ms() { awk -v v="$1" 'BEGIN { u = v; sub(/[0-9.]+/, "", u); n = v + 0;
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; printf "%.2f", n }'; }
    p50=$(ms "$(echo "$out" | awk '$1 == "50%" {print $2}')")
    p99=$(ms "$(echo "$out" | awk '$1 == "99%" {print $2}')")
    echo "$rps $p50 $p99 ${cpu%/}"
}

echo "wrk -t1 -c$CONNS -d${SECS}s, servers on CPU 0, wrk on CPU 1, $RUNS runs each (alternating)"
printf '%-4s %-9s %10s %10s %10s  %s\n' run path req/s "p50 ms" "p99 ms" "CPU µs/request (A/B)"
declare -A RPS P99
for r in $(seq 1 "$RUNS"); do
    for path in direct signpost threads2 haproxy floor; do
        cpu=""
        case $path in
            direct) read -r rps p50 p99 < <(run direct http://127.0.0.1:28080/) ;;
            signpost) read -r rps p50 p99 cpu < <(run signpost http://127.0.0.1:28001/ app "$SIDECAR_A $SIDECAR_B")
                      RSS_A=$(rss_mb $SIDECAR_A); RSS_B=$(rss_mb $SIDECAR_B) ;;
            threads2) read -r rps p50 p99 cpu < <(run threads2 http://127.0.0.1:28301/ app2 "$SIDECAR_A2 $SIDECAR_B2") ;;
            haproxy) read -r rps p50 p99 cpu < <(run haproxy http://127.0.0.1:29001/ "" "$HAPROXY_A $HAPROXY_B") ;;
            floor) read -r rps p50 p99 cpu < <(run floor http://127.0.0.1:29101/ app "$FLOOR_A $FLOOR_B") ;;
        esac
        RPS[$path]="${RPS[$path]:-} $rps"; P99[$path]="${P99[$path]:-} $p99"
        printf '%-4s %-9s %10s %10s %10s  %s\n' "$r" "$path" "$rps" "$p50" "$p99" "$cpu"
    done
done
median() { printf '%s\n' $@ | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : a[NR/2]}'; }
echo
for path in direct signpost threads2 haproxy floor; do
    echo "median $path: $(median ${RPS[$path]}) req/s, p99 $(median ${P99[$path]}) ms"
done
ratio() { awk -v a="$(median ${RPS[$1]})" -v b="$(median ${RPS[$2]})" 'BEGIN {printf "%.2f", a/b}'; }
echo "req/s ratios: signpost/haproxy $(ratio signpost haproxy), floor/haproxy $(ratio floor haproxy), signpost/floor $(ratio signpost floor), threads2/signpost $(ratio threads2 signpost)"
echo "sidecar RSS after the last signpost run: A ${RSS_A} MB, B ${RSS_B} MB"

if command -v oha >/dev/null; then
    echo
    # One open-loop run's tail swings by 2x on this shared machine: runs
    # alternate between the chains, and the medians are what to quote.
    echo "open loop, 5000 req/s for ${SECS}s with latency correction (oha), $RUNS runs each (alternating):"
    printf '%-4s %-9s %10s %10s %10s\n' run path "p50 ms" "p99 ms" "p99.9 ms"
    declare -A OL50 OL99 OL999
    # oha prints "99.00% in 3.0841 ms"; missing figures read as "-".
    pct() { echo "$1" | awk -v p="$2" '$1 == p "%" && $2 == "in" {
        v = $3; if ($4 == "secs" || $4 == "s") v *= 1000; else if ($4 == "us" || $4 == "µs") v /= 1000;
        printf "%.2f", v; found = 1 } END {if (!found) print "-"}'; }
    for r in $(seq 1 "$RUNS"); do
        for path in "signpost http://127.0.0.1:28001/ app" "haproxy http://127.0.0.1:29001/ haproxy"; do
            set -- $path
            out=$(taskset -c 1 oha --no-tui -q 5000 --latency-correction -z "${SECS}s" -c "$CONNS" -H "Host: $3" "$2")
            p50=$(pct "$out" 50.00); p99=$(pct "$out" 99.00); p999=$(pct "$out" 99.90)
            OL50[$1]="${OL50[$1]:-} $p50"; OL99[$1]="${OL99[$1]:-} $p99"; OL999[$1]="${OL999[$1]:-} $p999"
            printf '%-4s %-9s %10s %10s %10s\n' "$r" "$1" "$p50" "$p99" "$p999"
        done
    done
    for path in signpost haproxy; do
        echo "median $path: p50 $(median ${OL50[$path]}) ms, p99 $(median ${OL99[$path]}) ms, p99.9 $(median ${OL999[$path]}) ms"
    done
else
    echo "(oha not installed: cargo install oha, for the open-loop 5000 req/s figures)"
fi
