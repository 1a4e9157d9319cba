#!/usr/bin/env bash
# The Signpost demo, one command:
#   ./examples/demo.sh                    # walk through the steps, then wait for Ctrl-C
#   ./examples/demo.sh --non-interactive  # run the same steps and exit with a status
#
# It installs what is missing (Debian packages), builds, starts etcd (or falls
# back to --dev when etcd cannot run, and says so), starts `signpost server`,
# creates three "pods" - network namespaces with their own 10.x address and
# resolv.conf when run as root, loopback addresses otherwise - runs two `user`
# and one `order` service with a sidecar each, and shows discovery, mTLS and
# failover step by step, then a gRPC call balanced per call through the mesh. Everything it started is stopped on exit, and the
# namespaces are removed.
set -euo pipefail
cd "$(dirname "$0")/.."

INTERACTIVE=1
case "${1:-}" in
    --non-interactive) INTERACTIVE=0 ;;
    "") ;;
    *) echo "usage: $0 [--non-interactive]" >&2; exit 2 ;;
esac

. integration/deps.sh
signpost_install_deps

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }
run() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }
fail() { echo "demo failed: $*" >&2; exit 1; }
pause() { [ "$INTERACTIVE" = 1 ] && [ -t 0 ] && read -r -p "   (enter for the next step) " _ || true; }

WORK=$(mktemp -d /tmp/signpost-demo.XXXXXX)
PIDS=()
NETNS=()
BRIDGE=spdemo0
cleanup() {
    local code=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for ns in "${NETNS[@]}"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
    sleep 0.3
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in "${NETNS[@]}"; do
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    for n in 1 2 3 4; do ip link del "spdemo-h$n" 2>/dev/null || true; done
    ip link del "$BRIDGE" 2>/dev/null || true
    if [ $code -ne 0 ]; then
        echo "logs were in $WORK:" >&2
        for f in "$WORK"/*.log; do echo "--- $f" >&2; tail -n 15 "$f" >&2; done
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${SIGNPOST_DEMO_BIN_DIR:-}" ]; then
    # The test suite runs the demo with the binaries it already built.
    BIN=$SIGNPOST_DEMO_BIN_DIR
else
    bold "Building signpost and the example services (cargo build --release)"
    cargo build --release --quiet -p signpost -p signpost-examples --bins
    BIN=$PWD/target/release
fi
SIGNPOST=$BIN/signpost

# --- Where things live ------------------------------------------------------
USE_NETNS=0
if [ "$(id -u)" -eq 0 ] && ip netns add spdemo-probe 2>/dev/null; then
    ip netns del spdemo-probe
    USE_NETNS=1
fi
if [ $USE_NETNS = 1 ]; then
    NODE=10.123.0.1                   # the "node": bridge address, runs Signpost
    DNS_PORT=53                       # resolv.conf cannot name a port
    declare -A POD_IP=([user-1]=10.123.0.11 [user-2]=10.123.0.12 [order-1]=10.123.0.21 [echo-1]=10.123.0.31)
else
    NODE=127.0.0.1
    DNS_PORT=15353
    declare -A POD_IP=([user-1]=127.0.0.11 [user-2]=127.0.0.12 [order-1]=127.0.0.21 [echo-1]=127.0.0.31)
fi
API=http://$NODE:18500
export SIGNPOST_ADDR=$API
in_pod() { local pod=$1; shift; if [ $USE_NETNS = 1 ]; then ip netns exec "spdemo-$pod" "$@"; else "$@"; fi; }
# Starts a command in a pod in the background; $! is the command itself (exec
# all the way down), so killing $! kills it.
bg_in_pod() {
    local pod=$1 log=$2; shift 2
    if [ $USE_NETNS = 1 ]; then
        (exec ip netns exec "spdemo-$pod" "$@" >"$log" 2>&1) &
    else
        (exec "$@" >"$log" 2>&1) &
    fi
}

# --- etcd ---------------------------------------------------------------------
ETCD=http://127.0.0.1:12379
MODE=etcd
bold "Starting etcd on $ETCD (data in $WORK/etcd)"
if command -v etcd >/dev/null 2>&1; then
    etcd --name demo --data-dir "$WORK/etcd" \
        --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
        --listen-peer-urls http://127.0.0.1:12380 --initial-advertise-peer-urls http://127.0.0.1:12380 \
        --initial-cluster demo=http://127.0.0.1:12380 >"$WORK/etcd.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do curl -fsS "$ETCD/health" >/dev/null 2>&1 && break; sleep 0.2; done
    curl -fsS "$ETCD/health" >/dev/null 2>&1 || MODE=dev
else
    MODE=dev
fi
[ $MODE = etcd ] && say "etcd is up." || say "etcd could not start here: falling back to the in-memory store (--dev)."

# --- the node network -------------------------------------------------------
# Pods list two DNS replicas (examples/resolv.conf): the one inside
# `signpost server` and a `signpost dns` replica on a second node address,
# which needs etcd to watch.
DNS2=""
if [ $USE_NETNS = 1 ] && [ $MODE = etcd ]; then DNS2=10.123.0.2; fi
if [ $USE_NETNS = 1 ]; then
    bold "Creating pods: network namespaces on bridge $BRIDGE (10.123.0.0/24)"
    ip link del "$BRIDGE" 2>/dev/null || true
    ip link add "$BRIDGE" type bridge
    ip addr add "$NODE/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    RESOLVERS="nameserver $NODE"
    if [ -n "$DNS2" ]; then
        ip addr add "$DNS2/24" dev "$BRIDGE"
        RESOLVERS="$RESOLVERS
nameserver $DNS2"
    fi
    n=0
    for pod in user-1 user-2 order-1 echo-1; do
        n=$((n + 1))
        ns=spdemo-$pod
        ip netns del "$ns" 2>/dev/null || true
        ip link del "spdemo-h$n" 2>/dev/null || true
        ip netns add "$ns"; NETNS+=("$ns")
        ip link add "spdemo-h$n" type veth peer name "spdemo-c$n"
        ip link set "spdemo-c$n" netns "$ns"
        ip link set "spdemo-h$n" master "$BRIDGE" up
        ip netns exec "$ns" ip addr add "${POD_IP[$pod]}/24" dev "spdemo-c$n"
        ip netns exec "$ns" ip link set "spdemo-c$n" up
        ip netns exec "$ns" ip link set lo up
        mkdir -p "/etc/netns/$ns"
        printf '%s\nsearch xingren.host\noptions ndots:1 timeout:1 attempts:2\n' "$RESOLVERS" >"/etc/netns/$ns/resolv.conf"
        say "pod $pod: ${POD_IP[$pod]}, resolv.conf -> nameserver $NODE${DNS2:+ and $DNS2}, search xingren.host"
    done
else
    bold "Not root (or no network namespaces): pods are loopback addresses 127.0.0.11/12/21/31"
fi

# --- signpost server --------------------------------------------------------
bold "Starting signpost server (API $API, DNS $NODE:$DNS_PORT, mesh CA)"
"$SIGNPOST" ca init --dir "$WORK/ca" >/dev/null
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/admin.token"
SERVER_ARGS=(--api "$NODE:18500" --dns "$NODE:$DNS_PORT" --nsid demo-dns-1 --ca-dir "$WORK/ca" --admin-token-file "$WORK/admin.token")
if [ $MODE = etcd ]; then SERVER_ARGS+=(--etcd "$ETCD"); else SERVER_ARGS+=(--dev); fi
"$SIGNPOST" server "${SERVER_ARGS[@]}" >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -fsS "$API/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "$API/readyz" >/dev/null || fail "signpost server is not ready"
if [ -n "$DNS2" ]; then
    bold "Starting a second DNS replica: signpost dns on $DNS2:53 (its own etcd watch)"
    "$SIGNPOST" dns --etcd "$ETCD" --dns "$DNS2:53" --nsid demo-dns-2 --udp-sockets 1 \
        --allow-recursion 10.123.0.0/24,127.0.0.0/8 >"$WORK/dns2.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do dig +short +time=1 +tries=1 @"$DNS2" CH TXT id.server 2>/dev/null | grep -q demo-dns-2 && break; sleep 0.1; done
    say "replicas: $(dig +short +time=1 +tries=1 @"$NODE" CH TXT id.server) at $NODE, $(dig +short +time=1 +tries=1 @"$DNS2" CH TXT id.server) at $DNS2 (dig CH TXT id.server)"
fi
export SIGNPOST_TOKEN
SIGNPOST_TOKEN=$(cat "$WORK/admin.token")
say "ready. Admin token in $WORK/admin.token; each service gets its own token:"
"$SIGNPOST" token create --service user >"$WORK/user.token" 2>/dev/null
"$SIGNPOST" token create --service order >"$WORK/order.token" 2>/dev/null
"$SIGNPOST" token create --service echo >"$WORK/echo.token" 2>/dev/null
say "user -> $WORK/user.token, order -> $WORK/order.token, echo -> $WORK/echo.token (stored in etcd as hashes only)"
"$SIGNPOST" register dummy --id d1 --address 127.0.0.1 --port 1 >/dev/null   # warms up the catalog
"$SIGNPOST" deregister dummy d1 >/dev/null

# --- pods: app + sidecar ----------------------------------------------------
start_pod() {
    local pod=$1 svc=$2 ip=${POD_IP[$1]} app_args=()
    local app_addr inbound outbound admin
    if [ $USE_NETNS = 1 ]; then
        app_addr=127.0.0.1:8080; inbound=0.0.0.0:15006; outbound=127.0.0.1:15001; admin=127.0.0.1:15000
    else
        app_addr=$ip:8080; inbound=$ip:15006; outbound=$ip:15001; admin=$ip:15000
    fi
    local health=(--app-health /health)
    if [ "$svc" = order ]; then
        bg_in_pod "$pod" "$WORK/$pod-app.log" env http_proxy="http://$outbound" "$BIN/order" --listen "$app_addr" --id "$pod"
    elif [ "$svc" = echo ]; then
        # A gRPC server (h2c); it has no HTTP health endpoint.
        bg_in_pod "$pod" "$WORK/$pod-app.log" "$BIN/grpc-echo" --listen "$app_addr" --id "$pod"
        health=()
    else
        bg_in_pod "$pod" "$WORK/$pod-app.log" "$BIN/user" --listen "$app_addr" --id "$pod"
    fi
    PIDS+=($!)
    APP_PID[$pod]=$!
    bg_in_pod "$pod" "$WORK/$pod-sidecar.log" "$SIGNPOST" sidecar --service "$svc" --id "$pod" --address "$ip" --app "$app_addr" \
        "${health[@]}" --inbound "$inbound" --outbound "$outbound" --admin "$admin" \
        --control-plane "$API" --dns "$NODE:$DNS_PORT" --token-file "$WORK/$svc.token" \
        --ttl 6s --linger 5s --drain 5s
    PIDS+=($!)
}
declare -A APP_PID=()
pod_admin() { if [ $USE_NETNS = 1 ]; then echo 127.0.0.1:15000; else echo "${POD_IP[$1]}:15000"; fi; }
pod_app() { if [ $USE_NETNS = 1 ]; then echo 127.0.0.1:8080; else echo "${POD_IP[$1]}:8080"; fi; }

bold "Starting pods: user-1 and user-2 (service user), order-1 (service order), echo-1 (gRPC service echo), each app with a sidecar"
say "Each sidecar gets a certificate for spiffe://xingren.host/svc/<service> from the CA,"
say "registers its instance with a 6s TTL and heartbeats, and checks its app's /health."
for p in user-1:user user-2:user order-1:order echo-1:echo; do start_pod "${p%%:*}" "${p##*:}"; done
for pod in user-1 user-2 order-1 echo-1; do
    ok=0
    for _ in $(seq 150); do
        if in_pod "$pod" curl -fsS "http://$(pod_admin $pod)/ready" >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.1
    done
    [ $ok = 1 ] || fail "sidecar of $pod is not ready"
    say "$pod: sidecar ready"
done
pause

DIG=(dig @"$NODE" -p "$DNS_PORT" +time=2 +tries=1)
bold "1. Discovery is plain DNS: dig user.xingren.host"
say "The server answers from its etcd-backed catalog: one A record per healthy instance."
run "${DIG[@]}" user.xingren.host +noall +answer
[ "$("${DIG[@]}" user.xingren.host +short | wc -l)" -eq 2 ] || fail "expected 2 A records for user"
pause

bold "2. SRV gives ports and weights, with the addresses in the additional section"
run "${DIG[@]}" user.xingren.host SRV +noall +answer +additional
pause

if [ $USE_NETNS = 1 ]; then
    bold "3. Inside a pod, the short name works through resolv.conf's search domain"
    run ip netns exec spdemo-order-1 getent hosts user
    pause
fi

bold "4. The catalog from the CLI"
run "$SIGNPOST" services
run "$SIGNPOST" instances user
pause

bold "5. A request to order, which calls user through its sidecar over mTLS"
say "order's app uses http_proxy=http://127.0.0.1:15001 and asks for http://user/users/N;"
say "its sidecar resolves user by SRV, balances (P2C over peak-EWMA) and speaks mTLS to a user sidecar,"
say "which checks order's SPIFFE identity and passes the request to the user app."
for i in 1 2 3 4; do
    out=$(in_pod order-1 curl -fsS "http://$(pod_app order-1)/orders/$i") || fail "request $i to order failed"
    echo "   $out"
done
pause

bold "6. The metrics that prove it went over mTLS"
say "order's sidecar counted outbound requests to user; user's sidecars counted inbound ones,"
say "and the certificate expiry shows each sidecar holds a mesh certificate:"
in_pod order-1 curl -fsS "http://$(pod_admin order-1)/metrics" | grep -E '^signpost_sidecar_requests_total\{direction="outbound"' || fail "no outbound metric"
for pod in user-1 user-2; do
    in_pod "$pod" curl -fsS "http://$(pod_admin $pod)/metrics" | grep -E '^signpost_sidecar_(requests_total\{direction="inbound"|certificate_expiry_seconds)' | sed "s/^/$pod: /"
done
say "A plaintext request without a client certificate to a strict service is refused:"
curl -fsS -X PUT -H "Authorization: Bearer $SIGNPOST_TOKEN" -d '{"mtls": "strict", "allow": ["order"]}' "$API/v1/services/user/config" >/dev/null
sleep 1.5
code=$(in_pod order-1 curl -s -o /dev/null -w '%{http_code}' "http://${POD_IP[user-1]}:15006/users/1" || true)
say "plain HTTP to user-1's sidecar -> HTTP $code (mTLS required)"
[ "$code" != 200 ] || fail "strict mTLS let a plaintext request through"
pause

bold "7. gRPC through the mesh: HTTP/2 from the app, per-call balancing, gRPC statuses"
say "grpc-call in order-1's pod speaks HTTP/2 (prior knowledge) to its sidecar's outbound with"
say ":authority echo.xingren.host; the sidecars carry each call over mTLS to echo-1's app as HTTP/2."
pod_outbound() { if [ $USE_NETNS = 1 ]; then echo 127.0.0.1:15001; else echo "${POD_IP[$1]}:15001"; fi; }
run in_pod order-1 "$BIN/grpc-call" --target "$(pod_outbound order-1)" --authority echo.xingren.host unary --message hello --count 10 \
    || fail "gRPC calls through the mesh failed"
say "A call to a service with no instance is a gRPC status, not a broken stream:"
in_pod order-1 env RUST_BACKTRACE=0 "$BIN/grpc-call" --target "$(pod_outbound order-1)" --authority nosuch.xingren.host unary 2>&1 | head -n 1 | sed "s/^/   /" || true
say "order's sidecar counts gRPC statuses apart from HTTP ones:"
# Read the page once, then look in it: `curl | grep -q` fails the pipeline
# when grep stops reading before curl is done writing.
grpc_metrics=$(in_pod order-1 curl -fsS "http://$(pod_admin order-1)/metrics") || fail "no metrics from order's sidecar"
grep -E '^signpost_sidecar_grpc_responses_total\{direction="outbound"' <<<"$grpc_metrics" \
    || fail "no gRPC metric"
grep -qE '^signpost_sidecar_grpc_responses_total\{direction="outbound",service="echo",grpc_status="0"\} 10$' <<<"$grpc_metrics" \
    || fail "the 10 gRPC calls were not counted OK"
pause

bold "8. Kill user-1's app: the sidecars eject it, requests keep working"
kill "${APP_PID[user-1]}"
say "user-1's app is gone; its sidecar still answers, with an error — order's sidecar retries on user-2"
say "and ejects user-1 after failures; user-1's sidecar reports its app critical, so DNS drops it."
failed=0
for i in $(seq 1 20); do
    if ! in_pod order-1 curl -fsS -o /dev/null "http://$(pod_app order-1)/orders/$i"; then failed=$((failed + 1)); fi
done
say "20 requests after the kill: $failed failed"
[ $failed -le 5 ] || fail "too many failures after the kill"
for _ in $(seq 100); do
    [ "$("${DIG[@]}" user.xingren.host +short | wc -l)" -eq 1 ] && break
    sleep 0.2
done
[ "$("${DIG[@]}" user.xingren.host +short)" = "${POD_IP[user-2]}" ] || fail "user-1 is still in DNS after its app died"

run "${DIG[@]}" user.xingren.host +short
run "$SIGNPOST" instances user
in_pod order-1 curl -fsS "http://$(pod_admin order-1)/metrics" | grep -E '^signpost_sidecar_(ejections|retries)_total' || true

echo
bold "Try it by hand"
echo "   export SIGNPOST_ADDR=$API SIGNPOST_TOKEN=\$(cat $WORK/admin.token)"
echo "   $SIGNPOST services"
echo "   ${DIG[*]} user.xingren.host SRV"
[ $USE_NETNS = 1 ] && echo "   ip netns exec spdemo-order-1 curl http://127.0.0.1:8080/orders/1"
[ $USE_NETNS = 1 ] || echo "   curl http://${POD_IP[order-1]}:8080/orders/1"
echo "   logs: $WORK/*.log"
if [ "$INTERACTIVE" = 1 ]; then
    echo
    echo "Press Ctrl-C to stop everything the demo started (and remove the namespaces)."
    wait
fi
echo
echo "demo finished: all steps passed"
