#!/usr/bin/env bash
# etcd failover benchmark: a three-member etcd cluster on loopback, two
# `signpost server`s using all three members, a steady write (one
# registration every 50 ms, alternating between the two APIs) and DNS load
# (`dig` of a stable name every 50 ms, alternating between the two servers).
# Members are killed with SIGKILL, one case after the other:
#
#   kill a follower               5 s down, then restarted
#   kill the leader               5 s down, then restarted
#   quorum lost 20 s, restored    two of three members down for 20 s
#
# and one row per case is printed:
#
#   writes / failed   registrations started in the case / not answered 200
#   slowest503        the slowest failed write (goal: answered within 2 s)
#   max gap           the longest time without a successful write
#   dns q / dns fail  queries / queries not answered with the stable name
#                     (goal: 0 failures, DNS answers from its snapshot)
#   election          SIGKILL of the leader -> a new leader
#   writes in         new leader (or quorum back) -> first successful write
#                     (goal: within 2 s)
#   shards in         end of the case -> all 32 check shards held again
#                     (metric signpost_health_shards_held; goal: 5 s)
#
# and the registrations acknowledged and lost (goal: 0 lost). The same
# scenario's leader-kill case runs in the suite
# (integration/tests/failover.rs). Needs: etcd-server, bind9-dnsutils.
# Takes about a minute.
#
#   ./integration/bench/failover.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. integration/deps.sh
signpost_install_deps
cargo build --workspace --bins
cargo test -p signpost-integration --test failover failover_figures \
    -- --ignored --nocapture --test-threads 1 2>&1 |
    grep -vE '^(running|test |$)|^\s*$'
