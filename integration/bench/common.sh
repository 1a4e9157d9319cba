# Shared by the benchmark scripts (sourced from the repository root, after
# WORK and PIDS are set): one etcd on loopback and an admin token.

# bench_etcd NAME PORT [etcd flags...]: starts a one-member etcd with its
# client URL on PORT and peer URL on PORT+1, data under $WORK, waits until it
# is healthy, and sets ETCD to its client URL. $BENCH_PIN (e.g. "taskset -c
# 1") runs it pinned.
bench_etcd() {
    local name=$1 port=$2
    shift 2
    ETCD=http://127.0.0.1:$port
    local peer=http://127.0.0.1:$((port + 1))
    ${BENCH_PIN:-} etcd --name "$name" --data-dir "$WORK/etcd" \
        --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
        --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
        --initial-cluster "$name=$peer" "$@" >"$WORK/etcd.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do curl -fsS "$ETCD/health" >/dev/null 2>&1 && return; sleep 0.1; done
    echo "etcd did not start; see $WORK/etcd.log" >&2
    exit 1
}

# bench_token: a random admin token in $WORK/admin.token, also in TOKEN.
bench_token() {
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/admin.token"
    TOKEN=$(cat "$WORK/admin.token")
}
