//! The active health checker.
//!
//! Instances registered with a `check` get an HTTP or TCP probe at their
//! interval; the result is written to their health key. Two consecutive
//! failures make an instance critical, one success makes it passing again
//! (flapping one bad probe does not pull an instance out of DNS). The
//! checks are shared among the control-plane replicas by shard
//! ([`crate::shards`]): each replica checks the shards it holds, so a
//! replica added is checking capacity added. Each instance is probed at
//! its own place in its interval (`until_slot`), so checks registered or
//! taken over together are spread over the interval; an instance never
//! probed yet is probed at once, and a shard taken over keeps its
//! instances' stored health.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use imbl::ordmap::DiffItem;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::catalog::{Catalog, ServiceEntry};
use crate::model::{Check, CheckTarget, Health, HealthStatus, InstanceId, ServiceName};
use crate::shards::{ShardHolder, instance_hash, shard_of};
use crate::store::{Keys, Store, StoreError};

/// Consecutive failures that make an instance critical.
pub const FAILURES_TO_CRITICAL: u32 = 2;

/// How often the checker looks for due probes. Intervals are at least 1 s,
/// so 100 ms keeps probes within 10 % of their schedule.
const TICK: Duration = Duration::from_millis(100);

/// Probes in flight at most: the rest wait in the due queue for the next
/// tick, so that a burst of new instances (or a new leader taking over
/// thousands) does not open thousands of connections at once. With 100 ms
/// ticks this still starts up to 5,000 probes a second.
const MAX_PROBES_IN_FLIGHT: usize = 500;

/// The checker's metrics.
#[derive(Clone, Default)]
struct CheckerMetrics {
    shards: Gauge,
    checks: Gauge,
    probes: Family<ProbeLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    result: &'static str,
}

impl CheckerMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "signpost_health_shards_held",
            "Health check shards this control plane holds",
            m.shards.clone(),
        );
        registry.register(
            "signpost_health_checks",
            "Checked instances this control plane probes",
            m.checks.clone(),
        );
        registry.register(
            "signpost_health_probes",
            "Health probes run here, by result (pass or fail)",
            m.probes.clone(),
        );
        m
    }
}

/// How long from now until the instance's place in its interval: a place
/// fixed by a hash of its name on the wall clock, so that checks registered
/// or taken over together do not fire together, every interval after, and
/// every replica agrees on it.
fn until_slot(svc: &ServiceName, id: &InstanceId, interval: Duration) -> Duration {
    let i = u64::try_from(interval.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    let place = instance_hash(svc.as_str(), id.as_str()) % i;
    let clock = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| {
            u64::try_from(d.as_nanos() % u128::from(i)).unwrap_or(0)
        });
    Duration::from_nanos((place + i - clock) % i)
}

/// When a probe started now is next due: at the instance's slot, at least
/// half an interval away (so the first probe of a new instance, made at
/// once, is followed by one at its slot, and then one every interval).
fn next_due(svc: &ServiceName, id: &InstanceId, interval: Duration, now: Instant) -> Instant {
    let wait = until_slot(svc, id, interval);
    now + if wait < interval / 2 {
        wait + interval
    } else {
        wait
    }
}

/// Writes a health record if the instance still exists, under the
/// instance's lease so it vanishes with it. `since` is kept when the status
/// did not change. Returns whether the instance existed.
pub async fn write(
    store: &dyn Store,
    keys: &Keys,
    svc: &ServiceName,
    id: &InstanceId,
    status: HealthStatus,
    output: String,
    current: Option<Arc<Health>>,
) -> Result<bool, StoreError> {
    let instance_key = keys.instance(svc, id);
    let Some(instance) = store.get(&instance_key).await? else {
        return Ok(false);
    };
    let since = match current {
        Some(h) if h.status == status => h.since,
        _ => SystemTime::now(),
    };
    let health = Health {
        status,
        output,
        since,
    };
    let value = serde_json::to_vec(&health).map_err(|e| StoreError::Other(e.to_string()))?;
    store
        .put_if_present(&keys.health(svc, id), value, instance.lease, &instance_key)
        .await
}

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// Whether it passed.
    pub ok: bool,
    /// A short description ("HTTP 200", "connection refused").
    pub output: String,
}

/// Runs one probe.
pub async fn probe(check: &Check, http: &reqwest::Client) -> ProbeResult {
    match &check.target {
        CheckTarget::Http(url) => {
            match tokio::time::timeout(check.timeout, http.get(url).send()).await {
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    ProbeResult {
                        ok: status.is_success(),
                        output: format!("HTTP {status}"),
                    }
                }
                Ok(Err(err)) => ProbeResult {
                    ok: false,
                    output: describe_reqwest(&err),
                },
                Err(_) => ProbeResult {
                    ok: false,
                    output: format!("no answer within {:?}", check.timeout),
                },
            }
        }
        CheckTarget::Tcp(addr) => {
            match tokio::time::timeout(check.timeout, TcpStream::connect(addr.as_str())).await {
                Ok(Ok(_)) => ProbeResult {
                    ok: true,
                    output: format!("TCP connect to {addr}: ok"),
                },
                Ok(Err(err)) => ProbeResult {
                    ok: false,
                    output: format!("TCP connect to {addr}: {err}"),
                },
                Err(_) => ProbeResult {
                    ok: false,
                    output: format!(
                        "TCP connect to {addr}: no answer within {:?}",
                        check.timeout
                    ),
                },
            }
        }
    }
}

fn describe_reqwest(err: &reqwest::Error) -> String {
    // The innermost cause says what happened ("Connection refused").
    let mut source: &dyn std::error::Error = err;
    while let Some(next) = source.source() {
        source = next;
    }
    format!("HTTP request failed: {source}")
}

struct CheckState {
    check: Check,
    next_due: Instant,
    failures: u32,
    in_flight: bool,
}

/// The checker.
pub struct HealthChecker {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    candidate: String,
    http: reqwest::Client,
    metrics: CheckerMetrics,
}

impl HealthChecker {
    /// A checker that is member `candidate` among the checkers (unique per
    /// replica: host name and API address make a good one); its metrics go
    /// to `registry`.
    pub fn new(
        store: Arc<dyn Store>,
        catalog: Arc<Catalog>,
        candidate: String,
        registry: &mut Registry,
    ) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .build()
            .unwrap_or_default();
        Self {
            store,
            catalog,
            candidate,
            http,
            metrics: CheckerMetrics::register(registry),
        }
    }

    /// Holds shards and checks them, until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let (held_tx, held_rx) = watch::channel(BTreeSet::new());
        let holder = ShardHolder::new(
            self.store.clone(),
            self.catalog.keys().clone(),
            self.candidate.clone(),
        );
        tokio::join!(holder.run(held_tx, cancel.clone()), async {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = self.check(held_rx) => {}
            }
        });
    }

    async fn check(&self, mut held_rx: watch::Receiver<BTreeSet<u16>>) {
        let mut held: BTreeSet<u16> = BTreeSet::new();
        let mut states: HashMap<(ServiceName, InstanceId), CheckState> = HashMap::new();
        // Probes by when they are due: a tick starts the ones due, without
        // walking every checked instance.
        let mut due: BTreeSet<(Instant, (ServiceName, InstanceId))> = BTreeSet::new();
        // The services as of the last tick: a tick looks at what changed
        // since (`diff` skips what the snapshots share).
        let mut seen: imbl::OrdMap<ServiceName, Arc<ServiceEntry>> = imbl::OrdMap::new();
        let mut probes: JoinSet<((ServiceName, InstanceId), ProbeResult)> = JoinSet::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(done) = probes.join_next() => {
                    if let Ok((key, result)) = done {
                        if let Some(st) = states.get_mut(&key) {
                            st.in_flight = false;
                            due.insert((st.next_due, key.clone()));
                        }
                        let outcome = if result.ok { "pass" } else { "fail" };
                        self.metrics.probes.get_or_create(&ProbeLabels { result: outcome }).inc();
                        self.record(&mut states, key, result).await;
                    }
                    continue;
                }
            }
            let snap = self.catalog.snapshot();
            let now = Instant::now();
            let mut gained = BTreeSet::new();
            if held_rx.has_changed().unwrap_or(false) {
                let now_held = held_rx.borrow_and_update().clone();
                gained = now_held.difference(&held).copied().collect();
                held = now_held;
                states.retain(|(svc, id), _| held.contains(&shard_of(svc.as_str(), id.as_str())));
                self.metrics
                    .shards
                    .set(i64::try_from(held.len()).unwrap_or(0));
            }
            let mine = |svc: &ServiceName, id: &InstanceId| {
                held.contains(&shard_of(svc.as_str(), id.as_str()))
            };
            let mut add = |states: &mut HashMap<_, _>,
                           key: (ServiceName, InstanceId),
                           check: &Check,
                           at: Instant| {
                states.insert(
                    key.clone(),
                    CheckState {
                        check: check.clone(),
                        next_due: at,
                        failures: 0,
                        in_flight: false,
                    },
                );
                due.insert((at, key));
            };
            for change in seen.diff(&snap.services) {
                let (svc, old, new) = match change {
                    DiffItem::Add(svc, new) => (svc, None, Some(new)),
                    DiffItem::Update {
                        old: (svc, old),
                        new: (_, new),
                    } => (svc, Some(old), Some(new)),
                    DiffItem::Remove(svc, old) => (svc, Some(old), None),
                };
                let check_of = |entry: Option<&Arc<ServiceEntry>>, id: &InstanceId| {
                    entry
                        .and_then(|e| e.instances.get(id))
                        .and_then(|e| e.instance.check.clone())
                };
                // Forget instances that are gone or whose check changed.
                for id in old.into_iter().flat_map(|e| e.instances.keys()) {
                    let key = (svc.clone(), id.clone());
                    if states
                        .get(&key)
                        .is_some_and(|st| check_of(new, id).as_deref() != Some(&st.check))
                    {
                        states.remove(&key);
                    }
                }
                // Check new ones (and changed checks) at once.
                for (id, entry) in new.into_iter().flat_map(|e| e.instances.iter()) {
                    let Some(check) = &entry.instance.check else {
                        continue;
                    };
                    let key = (svc.clone(), id.clone());
                    if !mine(svc, id) || states.contains_key(&key) {
                        continue;
                    }
                    add(&mut states, key, check, now);
                }
            }
            // Shards just taken over: every checked instance in them.
            if !gained.is_empty() {
                for (svc, entry) in &snap.services {
                    for (id, e) in entry.instances.iter() {
                        let Some(check) = &e.instance.check else {
                            continue;
                        };
                        let key = (svc.clone(), id.clone());
                        if !gained.contains(&shard_of(svc.as_str(), id.as_str()))
                            || states.contains_key(&key)
                        {
                            continue;
                        }
                        // Known health carries over; the probe can wait for
                        // its place in the interval.
                        let at = match e.health {
                            Some(_) => now + until_slot(svc, id, check.interval),
                            None => now,
                        };
                        add(&mut states, key, check, at);
                    }
                }
            }
            seen = snap.services.clone();
            self.metrics
                .checks
                .set(i64::try_from(states.len()).unwrap_or(0));
            while let Some((at, _)) = due.first() {
                if *at > now || probes.len() >= MAX_PROBES_IN_FLIGHT {
                    break;
                }
                let Some((at, key)) = due.pop_first() else {
                    break;
                };
                // A state that is gone, or was rescheduled, left this entry
                // behind.
                let Some(st) = states.get_mut(&key) else {
                    continue;
                };
                if st.in_flight || st.next_due != at {
                    continue;
                }
                st.in_flight = true;
                st.next_due = next_due(&key.0, &key.1, st.check.interval, now);
                let check = st.check.clone();
                let http = self.http.clone();
                probes.spawn(async move {
                    let result = probe(&check, &http).await;
                    (key, result)
                });
            }
        }
    }

    async fn record(
        &self,
        states: &mut HashMap<(ServiceName, InstanceId), CheckState>,
        key: (ServiceName, InstanceId),
        result: ProbeResult,
    ) {
        let Some(st) = states.get_mut(&key) else {
            return;
        };
        st.failures = if result.ok { 0 } else { st.failures + 1 };
        let snap = self.catalog.snapshot();
        let (svc, id) = &key;
        let current = snap
            .service(svc)
            .and_then(|s| s.instances.get(id))
            .and_then(|e| e.health.clone());
        let status = if result.ok {
            HealthStatus::Passing
        } else if st.failures >= FAILURES_TO_CRITICAL {
            HealthStatus::Critical
        } else {
            // One failure: keep what was there (no record yet stays
            // critical, as a checked instance starts).
            return;
        };
        // Write on change of status or output only: a steady state costs
        // etcd nothing.
        if current
            .as_ref()
            .is_some_and(|h| h.status == status && h.output == result.output)
        {
            return;
        }
        if current.as_ref().is_none_or(|h| h.status != status) {
            tracing::info!(service = %svc, id = %id, %status, output = %result.output, "health changed");
        }
        if let Err(err) = write(
            &*self.store,
            self.catalog.keys(),
            svc,
            id,
            status,
            result.output,
            current,
        )
        .await
        {
            // An unreachable store is logged once by the store itself.
            if err.is_unavailable() {
                tracing::debug!(service = %svc, id = %id, %err, "could not write health");
            } else {
                tracing::warn!(service = %svc, id = %id, %err, "could not write health");
            }
            // Try again at the next interval.
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::model::Registration;
    use crate::store::MemoryStore;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn probes_are_spread_over_their_interval() {
        let svc = ServiceName::new("user").unwrap();
        let interval = Duration::from_secs(10);
        let now = Instant::now();
        let mut per_second = [0usize; 10];
        for i in 0..1000 {
            let id = InstanceId::new(&format!("u{i}")).unwrap();
            let wait = until_slot(&svc, &id, interval);
            assert!(wait < interval);
            per_second[wait.as_secs() as usize] += 1;
            // After a probe: the slot, half an interval to 1.5 away.
            let next = next_due(&svc, &id, interval, now) - now;
            assert!(
                next >= interval / 2 && next < interval + interval / 2,
                "{next:?}"
            );
            // The same slot (the clock moved on by microseconds between).
            let off = |a: Duration, b: Duration| a.abs_diff(b) < Duration::from_millis(5);
            assert!(
                off(next, wait) || off(next, wait + interval),
                "{next:?} vs {wait:?}"
            );
        }
        assert!(
            per_second.iter().all(|&n| n > 60 && n < 140),
            "{per_second:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_in_flight_are_bounded_and_all_run() {
        // An app that holds every probe for 1.5 s and counts them.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (now, most, served) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        tokio::spawn({
            let (now, most, served) = (now.clone(), most.clone(), served.clone());
            async move {
                while let Ok((mut conn, _)) = listener.accept().await {
                    let (now, most, served) = (now.clone(), most.clone(), served.clone());
                    tokio::spawn(async move {
                        let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(current, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        served.fetch_add(1, Ordering::SeqCst);
                        let _ = conn
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .await;
                    });
                }
            }
        });
        let store = Arc::new(MemoryStore::new());
        let keys = Keys::default();
        let svc = ServiceName::new("user").unwrap();
        let n = MAX_PROBES_IN_FLIGHT + 100;
        for i in 0..n {
            let id = InstanceId::new(&format!("u{i}")).unwrap();
            let inst = Registration {
                address: "127.0.0.1".into(),
                port: i64::from(port),
                check: Some(crate::model::CheckSpec {
                    http: Some(format!("http://127.0.0.1:{port}/health")),
                    interval: Some("30s".into()),
                    timeout: Some("3s".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }
            .validate(&svc, &id)
            .unwrap();
            let json = serde_json::to_vec(&inst).unwrap();
            store
                .put(&keys.instance(&svc, &id), json, None)
                .await
                .unwrap();
        }
        let catalog = Catalog::new(keys);
        let cancel = CancellationToken::new();
        tokio::spawn(catalog.clone().run(store.clone(), cancel.clone()));
        assert!(catalog.wait_synced(Duration::from_secs(5)).await);
        let checker = HealthChecker::new(store, catalog, "test".into(), &mut Registry::default());
        tokio::spawn(checker.run(cancel.clone()));
        let all =
            crate::testing::eventually(Duration::from_secs(15), Duration::from_millis(100), || {
                let served = served.clone();
                async move { served.load(Ordering::SeqCst) >= n }
            })
            .await;
        cancel.cancel();
        let most = most.load(Ordering::SeqCst);
        assert!(all, "{} of {n} probes ran", served.load(Ordering::SeqCst));
        assert!(
            most <= MAX_PROBES_IN_FLIGHT,
            "{most} probes in flight at once"
        );
        assert!(
            most >= MAX_PROBES_IN_FLIGHT / 2,
            "only {most} at once: the bound was not reached"
        );
    }
}
