//! etcd failover under load: a three-member etcd cluster on loopback, two
//! control planes writing registrations through their API, DNS queried at
//! both, and etcd members killed with SIGKILL.
//!
//! `leader_kill_loses_nothing_and_writes_come_back` is part of the suite.
//! `failover_figures` (ignored; `integration/bench/failover.sh` runs it)
//! goes through every case — a follower, the leader, quorum lost for 20 s,
//! restored — and prints the figures.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use signpost_control_plane::testing::EtcdCluster;
use signpost_integration::{ADMIN, Server, dig_short, spawn_server, wait_http_ok};

/// Every check shard ([`signpost_control_plane::shards::SHARDS`]).
const SHARDS: u64 = 32;

/// One registration attempt.
#[derive(Debug, Clone)]
struct Write {
    id: String,
    started: Instant,
    took: Duration,
    status: u16,
}

/// One DNS query.
#[derive(Debug, Clone)]
struct Query {
    at: Instant,
    ok: bool,
}

/// The steady load: registrations through both APIs, one every 50 ms, and
/// queries of a stable name at both DNS servers, one every 50 ms.
struct Load {
    stop: Arc<AtomicBool>,
    writes: Arc<Mutex<Vec<Write>>>,
    queries: Arc<Mutex<Vec<Query>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(servers: &[&Server]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(Mutex::new(Vec::new()));
        let queries = Arc::new(Mutex::new(Vec::new()));
        let apis: Vec<String> = servers.iter().map(|s| s.api.clone()).collect();
        let dns: Vec<SocketAddr> = servers.iter().map(|s| s.dns).collect();
        let writer = tokio::spawn({
            let (stop, writes) = (stop.clone(), writes.clone());
            async move {
                let http = reqwest::Client::new();
                let mut n = 0u64;
                // Bounded: at most 10 minutes of writes.
                while !stop.load(Ordering::Relaxed) && n < 12_000 {
                    let api = &apis[(n % apis.len() as u64) as usize];
                    let id = format!("w{n}");
                    let started = Instant::now();
                    let status = http
                        .put(format!("{api}/v1/services/load/instances/{id}"))
                        .bearer_auth(ADMIN)
                        .json(&json!({"address": "10.20.0.1", "port": 8080}))
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    writes.lock().unwrap().push(Write {
                        id,
                        started,
                        took: started.elapsed(),
                        status,
                    });
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        let querier = tokio::task::spawn_blocking({
            let (stop, queries) = (stop.clone(), queries.clone());
            move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < 12_000 {
                    let server = dns[(n % dns.len() as u64) as usize];
                    let at = Instant::now();
                    let ok = dig_short(server, "stable.xingren.host", "A", false) == ["10.30.0.1"];
                    queries.lock().unwrap().push(Query { at, ok });
                    n += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Load {
            stop,
            writes,
            queries,
            tasks: vec![writer, querier],
        }
    }

    async fn finish(self) -> (Vec<Write>, Vec<Query>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let writes = self.writes.lock().unwrap().clone();
        let queries = self.queries.lock().unwrap().clone();
        (writes, queries)
    }
}

/// Check shards held by both control planes together.
async fn shards_held(servers: &[&Server]) -> u64 {
    let http = reqwest::Client::new();
    let mut total = 0;
    for s in servers {
        let Ok(resp) = http
            .get(format!("{}/metrics", s.api))
            .timeout(Duration::from_secs(1))
            .send()
            .await
        else {
            continue;
        };
        let body = resp.text().await.unwrap_or_default();
        total += body
            .lines()
            .find(|l| l.starts_with("signpost_health_shards_held "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
    }
    total
}

/// Waits (at most `limit`) until every shard is held; how long it took.
async fn all_shards_held(servers: &[&Server], limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if shards_held(servers).await == SHARDS {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Waits (at most 10 s) for a leader other than `old`; the time it took.
async fn new_leader(cluster: &mut EtcdCluster, old: Option<usize>) -> Option<(usize, Duration)> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if let Some(leader) = cluster.leader().await
            && Some(leader) != old
        {
            return Some((leader, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// The figures of one window of the load.
#[derive(Debug, Default)]
struct Figures {
    writes: usize,
    failed_writes: usize,
    slowest_failure: Duration,
    longest_gap: Duration,
    dns_queries: usize,
    dns_failures: usize,
    /// From `since` to the first successful write started after it.
    first_write_after: Option<Duration>,
}

fn figures(
    writes: &[Write],
    queries: &[Query],
    from: Instant,
    to: Instant,
    since: Instant,
) -> Figures {
    let window: Vec<&Write> = writes
        .iter()
        .filter(|w| w.started >= from && w.started < to)
        .collect();
    let ok: Vec<&&Write> = window.iter().filter(|w| w.status == 200).collect();
    let mut longest_gap = Duration::ZERO;
    let mut last = from;
    for w in &ok {
        let done = w.started + w.took;
        longest_gap = longest_gap.max(done.saturating_duration_since(last));
        last = last.max(done);
    }
    longest_gap = longest_gap.max(to.saturating_duration_since(last));
    let failed: Vec<&&Write> = window.iter().filter(|w| w.status != 200).collect();
    let qs: Vec<&Query> = queries
        .iter()
        .filter(|q| q.at >= from && q.at < to)
        .collect();
    Figures {
        writes: window.len(),
        failed_writes: failed.len(),
        slowest_failure: failed.iter().map(|w| w.took).max().unwrap_or_default(),
        longest_gap,
        dns_queries: qs.len(),
        dns_failures: qs.iter().filter(|q| !q.ok).count(),
        first_write_after: ok
            .iter()
            .find(|w| w.started >= since)
            .map(|w| (w.started + w.took).duration_since(since)),
    }
}

/// Registrations answered 200 that neither control plane lists.
async fn lost_registrations(servers: &[&Server], writes: &[Write]) -> Vec<String> {
    let http = reqwest::Client::new();
    let mut lost = Vec::new();
    for s in servers {
        let body: serde_json::Value = http
            .get(format!("{}/v1/services/load", s.api))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let listed = body.to_string();
        for w in writes.iter().filter(|w| w.status == 200) {
            if !listed.contains(&format!("\"{}\"", w.id)) {
                lost.push(format!("{} (at {})", w.id, s.api));
            }
        }
    }
    lost
}

/// One case of `failover_figures`: its name, its window, the instant
/// "writes in" counts from, the election time and the shard takeover.
type Case = (
    String,
    Instant,
    Instant,
    Instant,
    Option<Duration>,
    Option<Duration>,
);

struct Setup {
    cluster: EtcdCluster,
    a: Server,
    b: Server,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let cluster = EtcdCluster::spawn(3).await;
    let dir = tempfile::tempdir().unwrap();
    let etcd = cluster.endpoints().join(",");
    let a = spawn_server("server-a", &etcd, &[], dir.path());
    let b = spawn_server("server-b", &etcd, &[], dir.path());
    for s in [&a, &b] {
        wait_http_ok(&format!("{}/readyz", s.api), Duration::from_secs(20)).await;
    }
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/services/stable/instances/s1", a.api))
        .bearer_auth(ADMIN)
        .json(&json!({"address": "10.30.0.1", "port": 80}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    signpost_integration::eventually("stable in both DNS", Duration::from_secs(5), || async {
        [a.dns, b.dns]
            .iter()
            .all(|d| dig_short(*d, "stable.xingren.host", "A", false) == ["10.30.0.1"])
    })
    .await;
    assert!(
        all_shards_held(&[&a, &b], Duration::from_secs(15))
            .await
            .is_some(),
        "the check shards were never all held"
    );
    Setup {
        cluster,
        a,
        b,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_loses_nothing_and_writes_come_back() {
    let mut s = setup().await;
    let servers = [&s.a, &s.b];
    let load = Load::start(&servers);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let leader = s.cluster.leader().await.expect("a leader");
    let killed_at = Instant::now();
    s.cluster.member(leader).stop();
    let (_, election) = new_leader(&mut s.cluster, Some(leader))
        .await
        .expect("no new leader within 10 s");
    let elected_at = killed_at + election;
    tokio::time::sleep(Duration::from_secs(4)).await;
    s.cluster.start(&[leader]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = Instant::now();
    let takeover = all_shards_held(&servers, Duration::from_secs(10)).await;
    let (writes, queries) = load.finish().await;

    let f = figures(&writes, &queries, killed_at, end, elected_at);
    let lost = lost_registrations(&servers, &writes).await;
    println!(
        "leader kill: new leader in {election:?}; {f:?}; lost {}; all shards held after {takeover:?}",
        lost.len()
    );
    assert!(lost.is_empty(), "registrations lost: {lost:?}");
    assert_eq!(f.dns_failures, 0, "{f:?}");
    assert!(f.dns_queries > 20, "{f:?}");
    let back = f
        .first_write_after
        .expect("no write succeeded after the election");
    assert!(
        back <= Duration::from_secs(2),
        "writes back {back:?} after the new leader; {f:?}"
    );
    assert!(f.slowest_failure <= Duration::from_secs(2), "{f:?}");
    assert!(
        takeover.is_some(),
        "check shards not all held 10 s after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "figures for integration/bench/failover.sh: about 70 s"]
async fn failover_figures() {
    let mut s = setup().await;
    let servers = [&s.a, &s.b];
    let load = Load::start(&servers);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rows: Vec<Case> = Vec::new();

    // A follower.
    let leader = s.cluster.leader().await.expect("a leader");
    let follower = (leader + 1) % s.cluster.len();
    let from = Instant::now();
    s.cluster.member(follower).stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    s.cluster.start(&[follower]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let takeover = all_shards_held(&servers, Duration::from_secs(15)).await;
    rows.push((
        "kill a follower".into(),
        from,
        Instant::now(),
        from,
        None,
        takeover,
    ));

    // The leader.
    let leader = s.cluster.leader().await.expect("a leader");
    let from = Instant::now();
    s.cluster.member(leader).stop();
    let (_, election) = new_leader(&mut s.cluster, Some(leader))
        .await
        .expect("new leader");
    tokio::time::sleep(Duration::from_secs(5)).await;
    s.cluster.start(&[leader]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let takeover = all_shards_held(&servers, Duration::from_secs(15)).await;
    rows.push((
        "kill the leader".into(),
        from,
        Instant::now(),
        from + election,
        Some(election),
        takeover,
    ));

    // Quorum lost for 20 s (two of three members), then restored.
    let from = Instant::now();
    let down: Vec<usize> = (0..2).collect();
    for &i in &down {
        s.cluster.member(i).stop();
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    let restored = Instant::now();
    s.cluster.start(&down).await;
    let takeover = all_shards_held(&servers, Duration::from_secs(30)).await;
    let quorum_back = restored;
    tokio::time::sleep(Duration::from_secs(5)).await;
    rows.push((
        "quorum lost 20 s, restored".into(),
        from,
        Instant::now(),
        quorum_back,
        None,
        takeover,
    ));
    let (writes, queries) = load.finish().await;
    let lost = lost_registrations(&servers, &writes).await;

    println!();
    println!(
        "{:<28} {:>7} {:>7} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10} {:>12}",
        "case",
        "writes",
        "failed",
        "slowest503",
        "max gap",
        "dns q",
        "dns fail",
        "election",
        "writes in",
        "shards in"
    );
    for (case, from, to, since, election, takeover) in &rows {
        let f = figures(&writes, &queries, *from, *to, *since);
        let ms =
            |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2}s", d.as_secs_f64()));
        println!(
            "{:<28} {:>7} {:>7} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10} {:>12}",
            case,
            f.writes,
            f.failed_writes,
            ms(Some(f.slowest_failure)),
            ms(Some(f.longest_gap)),
            f.dns_queries,
            f.dns_failures,
            ms(*election),
            ms(f.first_write_after),
            ms(*takeover),
        );
    }
    println!(
        "registrations acknowledged: {}, lost: {}",
        writes.iter().filter(|w| w.status == 200).count(),
        lost.len()
    );
    for (name, server) in [("a", &s.a), ("b", &s.b)] {
        let log = server.process.output();
        println!(
            "server {name}: {} log lines ({} of them the write load's 'registered'), {} bytes over the whole run; 'etcd: unreachable' {} times, 'reachable again' {} times",
            log.lines().count(),
            log.lines().filter(|l| l.contains(" registered")).count(),
            log.len(),
            log.matches("etcd: unreachable").count(),
            log.matches("etcd: reachable again").count(),
        );
    }
    println!(
        "(writes in: from the new leader, or from quorum restored, to the first successful write; shards in: from the end of the case until all {SHARDS} check shards are held)"
    );
    assert!(lost.is_empty(), "registrations lost: {lost:?}");
}
