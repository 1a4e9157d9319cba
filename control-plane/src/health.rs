//! The active health checker.
//!
//! Instances registered with a `check` get an HTTP or TCP probe at their
//! interval; the result is written to their health key. Two consecutive
//! failures make an instance critical, one success makes it passing again
//! (flapping one bad probe does not pull an instance out of DNS). Only one
//! checker runs at a time across control-plane replicas: each replica
//! campaigns in the store's election and checks only while it leads.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use imbl::ordmap::DiffItem;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, ServiceEntry};
use crate::model::{Check, CheckTarget, Health, HealthStatus, InstanceId, ServiceName};
use crate::store::{Keys, Store, StoreError};

/// Consecutive failures that make an instance critical.
pub const FAILURES_TO_CRITICAL: u32 = 2;

/// How often the checker looks for due probes. Intervals are at least 1 s,
/// so 100 ms keeps probes within 10 % of their schedule.
const TICK: Duration = Duration::from_millis(100);

/// Lease of the checker's leadership: a crashed leader is replaced within
/// this long.
const LEADER_TTL: Duration = Duration::from_secs(10);

/// Name of the election.
const ELECTION: &str = "health-checker";

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
    current: Option<Health>,
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
}

impl HealthChecker {
    /// A checker named `candidate` in the election (host name and API address
    /// make a good one).
    pub fn new(store: Arc<dyn Store>, catalog: Arc<Catalog>, candidate: String) -> Self {
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
        }
    }

    /// Campaigns and checks while leading, until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let election = self.catalog.keys().election(ELECTION);
        crate::store::while_leading(
            &*self.store,
            &election,
            &self.candidate,
            LEADER_TTL,
            "health checker",
            &cancel,
            || self.check_while_leading(),
        )
        .await;
    }

    async fn check_while_leading(&self) {
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
                        self.record(&mut states, key, result).await;
                    }
                    continue;
                }
            }
            let snap = self.catalog.snapshot();
            let now = Instant::now();
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
                        .is_some_and(|st| check_of(new, id).as_ref() != Some(&st.check))
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
                    if states.contains_key(&key) {
                        continue;
                    }
                    states.insert(
                        key.clone(),
                        CheckState {
                            check: check.clone(),
                            next_due: now,
                            failures: 0,
                            in_flight: false,
                        },
                    );
                    due.insert((now, key));
                }
            }
            seen = snap.services.clone();
            while let Some((at, _)) = due.first() {
                if *at > now {
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
                st.next_due = now + st.check.interval;
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
            // One failure: keep what was there (unknown stays unreported).
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
            tracing::warn!(service = %svc, id = %id, %err, "could not write health");
            // Try again at the next interval.
        }
    }
}
