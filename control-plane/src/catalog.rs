//! The catalog: one store watch folded into immutable snapshots.
//!
//! A [`Catalog`] holds the latest [`Snapshot`] behind an `ArcSwap`; readers
//! (API reads, DNS queries, the health checker) load it without locks and
//! never call the store. A background task ([`Catalog::run`]) reads the
//! prefix once, then watches it from the next revision, applying each batch of
//! events to a private [`CatalogState`] and publishing a new snapshot stamped
//! with the store revision. When the watch is lost or the revision was
//! compacted, it reads the range again and watches anew; meanwhile readers
//! keep the last snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use litemap::LiteMap;

use crate::model::{
    Health, HealthStatus, Instance, InstanceId, Interner, ServiceConfig, ServiceName,
};
use crate::store::{KeyKind, KeyValue, Keys, LeaseId, Revision, Store, StoreError, WatchEvent};

/// One instance with its health, as of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEntry {
    /// The instance record, shared with the catalog's state and every
    /// snapshot that holds it unchanged.
    pub instance: Arc<Instance>,
    /// The latest check result, if the instance has a check that has run
    /// (behind a pointer, shared with the catalog's state: most instances
    /// have none).
    pub health: Option<Arc<Health>>,
    /// Revision of the instance record's last write.
    pub mod_revision: Revision,
    /// The lease the record lives under (TTL registrations).
    pub lease: Option<LeaseId>,
}

impl InstanceEntry {
    /// Healthy when its latest health record is passing. Without a record,
    /// an instance with a check is not healthy until a probe passes (as
    /// Consul's checks start critical), and one without a check is healthy:
    /// a TTL-registered instance proves itself by heartbeating.
    pub fn is_healthy(&self) -> bool {
        match &self.health {
            Some(h) => h.status == HealthStatus::Passing,
            None => self.instance.check.is_none(),
        }
    }

    /// The health status as shown to users.
    pub fn status(&self) -> HealthStatus {
        if self.is_healthy() {
            HealthStatus::Passing
        } else {
            HealthStatus::Critical
        }
    }
}

/// One service as of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Instances by id: a sorted vector, as most services have a few
    /// instances, which a tree would hold in a node sized for eleven.
    pub instances: LiteMap<InstanceId, InstanceEntry>,
    /// Settings, if any were written.
    pub config: Option<ServiceConfig>,
    /// The last revision that changed anything of this service (the blocking
    /// query index).
    pub index: Revision,
}

impl ServiceEntry {
    /// Its healthy instances, in id order.
    pub fn healthy(&self) -> impl Iterator<Item = &InstanceEntry> {
        self.instances.values().filter(|e| e.is_healthy())
    }

    /// Number of healthy instances.
    pub fn healthy_count(&self) -> usize {
        self.healthy().count()
    }
}

/// An immutable view of the whole catalog at one store revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The store revision this snapshot reflects.
    pub revision: Revision,
    /// When it was built (for the snapshot-age metric).
    pub built: SystemTime,
    /// Services by name. A service with no instances and no config is
    /// absent. A service that did not change between two snapshots is the
    /// same `Arc` in both, and the map shares its structure with the last
    /// snapshot's: publishing a change costs what it changed, and
    /// [`imbl::OrdMap::diff`] between two snapshots visits only what
    /// differs.
    pub services: imbl::OrdMap<ServiceName, Arc<ServiceEntry>>,
    /// Services that existed and are gone, with the revision that removed
    /// them (the blocking-query index of a deleted service).
    pub deleted: imbl::OrdMap<ServiceName, Revision>,
    /// Instances in all services (kept as services change, for metrics).
    pub instances: usize,
    /// Healthy instances in all services.
    pub healthy: usize,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            revision: 0,
            built: SystemTime::UNIX_EPOCH,
            services: imbl::OrdMap::new(),
            deleted: imbl::OrdMap::new(),
            instances: 0,
            healthy: 0,
        }
    }
}

impl Snapshot {
    /// Whether this snapshot was read from the store (or published by a
    /// test), as opposed to the empty one a [`Catalog`] starts with: a DNS
    /// server that has never loaded the catalog must not answer "no such
    /// name" for the zone.
    pub fn is_loaded(&self) -> bool {
        self.built != SystemTime::UNIX_EPOCH
    }

    /// A service by name.
    pub fn service(&self, name: &ServiceName) -> Option<&ServiceEntry> {
        self.services.get(name).map(|entry| &**entry)
    }
}

/// The mutable state the watch task folds events into. Public so that tests
/// (and the DNS crate's tests) can build snapshots without a store.
///
/// Snapshots are built incrementally: every service keeps its last built
/// [`ServiceEntry`] behind an `Arc`, and an event changes only the services
/// it touched. Unchanged services are the same `Arc` from one snapshot to
/// the next, so consumers (the DNS index) can skip them by pointer. The
/// built entries are the state itself: a service an event touches is
/// copied out of them once, changed in place until the next snapshot, and
/// put back — the catalog holds each instance once, not once as read and
/// once as built.
#[derive(Debug, Clone, Default)]
pub struct CatalogState {
    /// The services changed since they were last built, as they are now.
    work: BTreeMap<ServiceName, ServiceEntry>,
    /// Health records by service and instance, kept apart from the
    /// instances: a health record may be written before its instance, or
    /// outlive it until the checker deletes it.
    health: BTreeMap<ServiceName, LiteMap<InstanceId, Arc<Health>>>,
    /// Last revision that touched each service, kept after the service is
    /// gone so a blocking query on it sees the deletion.
    index: BTreeMap<ServiceName, Revision>,
    /// The services as last built.
    built: imbl::OrdMap<ServiceName, Arc<ServiceEntry>>,
    /// The services that are gone, with their last index.
    deleted: imbl::OrdMap<ServiceName, Revision>,
    /// Instances and healthy instances in `built`.
    totals: (usize, usize),
    /// The tags, metadata and port names of every instance, each held once.
    strings: Interner,
    revision: Revision,
}

impl CatalogState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the state with a full range read.
    pub fn reset(&mut self, keys: &Keys, kvs: &[KeyValue], revision: Revision) {
        let mut fresh = Self::default();
        for kv in kvs {
            fresh.put(keys, kv);
        }
        self.replace(fresh, revision);
    }

    /// Replaces the state with `fresh`, a full read at `revision` (see
    /// [`Store::range_pages`]).
    pub fn replace(&mut self, fresh: CatalogState, revision: Revision) {
        let old_index = std::mem::take(&mut self.index);
        *self = fresh;
        // Services that vanished while we were not watching still need their
        // waiters woken: stamp them with the read's revision.
        for name in old_index.into_keys() {
            if !self.index.contains_key(&name) {
                self.index.insert(name.clone(), revision);
                self.work.entry(name).or_default();
            }
        }
        self.revision = revision;
    }

    /// Applies one put.
    pub fn put(&mut self, keys: &Keys, kv: &KeyValue) {
        match keys.parse(&kv.key) {
            KeyKind::Instance(svc, id) => match serde_json::from_slice::<Instance>(&kv.value) {
                Ok(mut inst) => {
                    // Hold the names once: the record's own copies give way
                    // to the key's, which every map here shares.
                    let svc = self.known_name(svc);
                    if inst.service == svc {
                        inst.service = svc.clone();
                    }
                    if inst.id == id {
                        inst.id = id.clone();
                    }
                    self.strings.intern_instance(&mut inst);
                    let health = self.health.get(&svc).and_then(|h| h.get(&id)).cloned();
                    let entry = InstanceEntry {
                        instance: Arc::new(inst),
                        health,
                        mod_revision: kv.mod_revision,
                        lease: kv.lease,
                    };
                    self.working(&svc, kv.mod_revision)
                        .instances
                        .insert(id, entry);
                }
                Err(err) => {
                    tracing::warn!(key = %kv.key, %err, "ignoring unreadable instance record")
                }
            },
            KeyKind::Health(svc, id) => match serde_json::from_slice::<Health>(&kv.value) {
                Ok(h) => {
                    let h = Arc::new(h);
                    let svc = self.known_name(svc);
                    if let Some(e) = self.working(&svc, kv.mod_revision).instances.get_mut(&id) {
                        e.health = Some(h.clone());
                    }
                    self.health.entry(svc).or_default().insert(id, h);
                }
                Err(err) => {
                    tracing::warn!(key = %kv.key, %err, "ignoring unreadable health record")
                }
            },
            KeyKind::Config(svc) => match serde_json::from_slice::<ServiceConfig>(&kv.value) {
                Ok(c) => {
                    let svc = self.known_name(svc);
                    self.working(&svc, kv.mod_revision).config = Some(c);
                }
                Err(err) => {
                    tracing::warn!(key = %kv.key, %err, "ignoring unreadable service config")
                }
            },
            KeyKind::Token(_) | KeyKind::Other => {}
        }
        self.revision = self.revision.max(kv.mod_revision);
    }

    /// Applies one delete.
    pub fn delete(&mut self, keys: &Keys, key: &str, revision: Revision) {
        match keys.parse(key) {
            KeyKind::Instance(svc, id) => {
                self.working(&svc, revision).instances.remove(&id);
            }
            KeyKind::Health(svc, id) => {
                if let Some(e) = self.working(&svc, revision).instances.get_mut(&id) {
                    e.health = None;
                }
                if let Some(inner) = self.health.get_mut(&svc) {
                    inner.remove(&id);
                    if inner.is_empty() {
                        self.health.remove(&svc);
                    }
                }
            }
            KeyKind::Config(svc) => {
                self.working(&svc, revision).config = None;
            }
            KeyKind::Token(_) | KeyKind::Other => {}
        }
        self.revision = self.revision.max(revision);
    }

    /// Applies one watch event.
    pub fn apply(&mut self, keys: &Keys, event: &WatchEvent) {
        match event {
            WatchEvent::Put(kv) => self.put(keys, kv),
            WatchEvent::Delete { key, mod_revision } => self.delete(keys, key, *mod_revision),
        }
    }

    /// Raises the state's revision (a watch batch may end past its last event).
    pub fn advance(&mut self, revision: Revision) {
        self.revision = self.revision.max(revision);
    }

    /// The catalog's own copy of the name `svc`, if it has one, so that
    /// every map shares it.
    fn known_name(&self, svc: ServiceName) -> ServiceName {
        if let Some((known, _)) = self.work.get_key_value(&svc) {
            return known.clone();
        }
        match self.built.get_key_value(&svc) {
            Some((known, _)) => known.clone(),
            None => svc,
        }
    }

    /// The service `svc` as it is now, to change it at `revision`: copied
    /// out of the built services on its first change since the last
    /// snapshot.
    fn working(&mut self, svc: &ServiceName, revision: Revision) -> &mut ServiceEntry {
        let index = self.index.entry(svc.clone()).or_insert(revision);
        *index = (*index).max(revision);
        let built = &self.built;
        self.work.entry(svc.clone()).or_insert_with(|| {
            built
                .get(svc)
                .map(|e| ServiceEntry::clone(e))
                .unwrap_or_default()
        })
    }

    /// An immutable snapshot of the current state. Only the services
    /// changed since the last call are built again.
    pub fn snapshot(&mut self) -> Snapshot {
        self.snapshot_and_changes().0
    }

    /// [`CatalogState::snapshot`], and the services it changed.
    pub fn snapshot_and_changes(&mut self) -> (Snapshot, BTreeSet<ServiceName>) {
        let work = std::mem::take(&mut self.work);
        let mut changed = BTreeSet::new();
        let counts = |e: &ServiceEntry| (e.instances.len(), e.healthy_count());
        for (svc, mut entry) in work {
            if let Some(old) = self.built.get(&svc) {
                let (instances, healthy) = counts(old);
                self.totals.0 -= instances;
                self.totals.1 -= healthy;
            }
            if entry.config.is_none() && entry.instances.is_empty() {
                self.built.remove(&svc);
                if let Some(index) = self.index.get(&svc) {
                    self.deleted.insert(svc.clone(), *index);
                }
            } else {
                entry.index = self.index.get(&svc).copied().unwrap_or(self.revision);
                // The working copy's vector grew by doubling; the built
                // entry is kept until its service changes again (when it
                // is copied anew), so it keeps its exact size.
                let mut exact = std::mem::take(&mut entry.instances).into_tuple_vec();
                exact.shrink_to_fit();
                entry.instances = LiteMap::from_sorted_store_unchecked(exact);
                let (instances, healthy) = counts(&entry);
                self.totals.0 += instances;
                self.totals.1 += healthy;
                self.deleted.remove(&svc);
                self.built.insert(svc.clone(), Arc::new(entry));
            }
            changed.insert(svc);
        }
        let snapshot = Snapshot {
            revision: self.revision,
            built: SystemTime::now(),
            services: self.built.clone(),
            deleted: self.deleted.clone(),
            instances: self.totals.0,
            healthy: self.totals.1,
        };
        (snapshot, changed)
    }

    /// The blocking-query index of a service that is absent from snapshots
    /// (deleted), if it ever existed.
    pub fn tombstone_index(&self, svc: &ServiceName) -> Option<Revision> {
        self.index.get(svc).copied()
    }
}

/// The live catalog: the latest snapshot, its subscribers, and whether the
/// watch is currently connected.
pub struct Catalog {
    keys: Keys,
    current: ArcSwap<Snapshot>,
    tx: watch::Sender<Arc<Snapshot>>,
    synced: AtomicBool,
    /// Full reads of the catalog so far (the first, and every resync).
    loads: AtomicU64,
    /// Wake-ups of the tasks waiting on one service ([`Catalog::wait_service`]),
    /// sent when a snapshot changes that service: a change wakes the
    /// waiters of what it changed, not every waiter.
    waiters: std::sync::Mutex<std::collections::HashMap<ServiceName, watch::Sender<()>>>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("revision", &self.current.load().revision)
            .field("synced", &self.is_synced())
            .finish()
    }
}

/// How long the watch task waits before retrying after losing the store,
/// doubling up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

impl Catalog {
    /// An empty catalog over `keys`; call [`Catalog::run`] to fill it.
    pub fn new(keys: Keys) -> Arc<Self> {
        let empty = Arc::new(Snapshot::default());
        let (tx, _) = watch::channel(empty.clone());
        Arc::new(Self {
            keys,
            current: ArcSwap::new(empty),
            tx,
            synced: AtomicBool::new(false),
            loads: AtomicU64::new(0),
            waiters: Default::default(),
        })
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A receiver told of every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// How many full reads of the catalog have completed: the first, and
    /// one for every resync (a lost watch, a compacted revision).
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Whether the watch is connected (the snapshot is current).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// The blocking-query index of `svc` in the latest snapshot, taking
    /// deleted services into account.
    pub fn service_index(&self, svc: &ServiceName) -> Revision {
        let snap = self.snapshot();
        match snap.service(svc) {
            Some(entry) => entry.index.max(1),
            None => snap.deleted.get(svc).copied().unwrap_or(snap.revision),
        }
    }

    /// Publishes a snapshot built from `state`.
    pub fn publish(&self, state: &mut CatalogState) {
        let (snap, changed) = state.snapshot_and_changes();
        let snap = Arc::new(snap);
        self.current.store(snap.clone());
        self.tx.send_replace(snap);
        let waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        if waiters.is_empty() {
            return;
        }
        for svc in &changed {
            if let Some(tx) = waiters.get(svc) {
                tx.send_replace(());
            }
        }
    }

    /// Waits until a snapshot satisfies `done`, or the timeout passes,
    /// woken only by snapshots that change `svc` (and by resyncs, which
    /// change every service): for conditions on that one service, such as
    /// a blocking query's index or a write to it becoming visible. Returns
    /// whether it was satisfied.
    pub async fn wait_service(
        &self,
        svc: &ServiceName,
        timeout: Duration,
        done: impl Fn(&Snapshot) -> bool,
    ) -> bool {
        let mut rx = {
            let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            waiters
                .entry(svc.clone())
                .or_insert_with(|| watch::channel(()).0)
                .subscribe()
        };
        // Subscribed before the first look: a change published in between
        // is seen by `changed`.
        let wait = async {
            while !done(&self.snapshot()) {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let satisfied = tokio::time::timeout(timeout, wait).await.is_ok() && done(&self.snapshot());
        drop(rx);
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        if waiters.get(svc).is_some_and(|tx| tx.receiver_count() == 0) {
            waiters.remove(svc);
        }
        satisfied
    }

    /// Waits until the first snapshot has been read from the store, or the
    /// timeout passes. Returns whether it is synced.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.subscribe();
        let wait = async {
            while !self.is_synced() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.is_synced()
    }

    /// Keeps the catalog current from `store` until `cancel` fires: a range
    /// read, then a watch from the next revision; on any loss, again.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, cancel: CancellationToken) {
        let mut state = CatalogState::new();
        let mut backoff = FIRST_RETRY;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.sync_once(&*store, &mut state, &mut backoff) => r,
            };
            self.synced.store(false, Ordering::Relaxed);
            // Tell subscribers (readiness, metrics) that we are out of sync.
            self.tx.send_modify(|_| {});
            match result {
                Err(StoreError::Compacted { requested, .. }) => {
                    tracing::info!(
                        requested,
                        "watch revision compacted; reading the catalog again"
                    );
                }
                // Warn when a synced watch is lost; the retries of one
                // outage are not news (the store logs etcd coming back).
                Err(err) if backoff == FIRST_RETRY => {
                    tracing::warn!(%err, "catalog watch lost; retrying with backoff")
                }
                Err(err) => tracing::debug!(%err, retry_in = ?backoff, "catalog watch lost"),
                Ok(()) => tracing::warn!(retry_in = ?backoff, "catalog watch ended"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(crate::store::jitter(backoff)) => {}
            }
            backoff = (backoff * 2).min(MAX_RETRY);
        }
    }

    async fn sync_once(
        &self,
        store: &dyn Store,
        state: &mut CatalogState,
        backoff: &mut Duration,
    ) -> Result<(), StoreError> {
        let prefix = self.keys.prefix().to_string();
        // Read into a state of its own: a read that fails half-way leaves
        // the current one (and its snapshot) as it was.
        let mut fresh = CatalogState::new();
        let keys = &self.keys;
        let revision = store
            .range_pages(&prefix, &mut |page| {
                for kv in &page {
                    fresh.put(keys, kv);
                }
            })
            .await?;
        state.replace(fresh, revision);
        self.loads.fetch_add(1, Ordering::Relaxed);
        let mut stream = store.watch(&prefix, revision + 1).await?;
        self.synced.store(true, Ordering::Relaxed);
        self.publish(state);
        *backoff = FIRST_RETRY;
        tracing::debug!(revision, "catalog synced");
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            for event in &batch.events {
                state.apply(&self.keys, event);
            }
            state.advance(batch.revision);
            self.publish(state);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Registration, ServiceName};

    fn kv(key: String, value: Vec<u8>, rev: Revision) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: rev,
            mod_revision: rev,
            lease: None,
        }
    }

    fn instance(svc: &str, id: &str, addr: &str) -> Instance {
        Registration {
            address: addr.into(),
            port: 80,
            ..Default::default()
        }
        .validate(
            &ServiceName::new(svc).unwrap(),
            &InstanceId::new(id).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn state_folds_puts_and_deletes() {
        let keys = Keys::default();
        let user = ServiceName::new("user").unwrap();
        let u1 = InstanceId::new("u1").unwrap();
        let mut state = CatalogState::new();
        let inst = instance("user", "u1", "10.0.0.1");
        state.put(
            &keys,
            &kv(
                keys.instance(&user, &u1),
                serde_json::to_vec(&inst).unwrap(),
                5,
            ),
        );
        let snap = state.snapshot();
        assert_eq!(snap.revision, 5);
        let svc = snap.service(&user).unwrap();
        assert_eq!(svc.index, 5);
        assert_eq!(svc.healthy_count(), 1);

        let critical = Health {
            status: HealthStatus::Critical,
            output: "connection refused".into(),
            since: SystemTime::now(),
        };
        state.put(
            &keys,
            &kv(
                keys.health(&user, &u1),
                serde_json::to_vec(&critical).unwrap(),
                6,
            ),
        );
        let snap = state.snapshot();
        assert_eq!(snap.service(&user).unwrap().healthy_count(), 0);
        assert_eq!(snap.service(&user).unwrap().index, 6);

        state.delete(&keys, &keys.instance(&user, &u1), 7);
        state.delete(&keys, &keys.health(&user, &u1), 7);
        let snap = state.snapshot();
        assert!(snap.service(&user).is_none());
        assert_eq!(state.tombstone_index(&user), Some(7));
    }

    #[test]
    fn snapshots_share_unchanged_services() {
        let keys = Keys::default();
        let mut state = CatalogState::new();
        let put = |state: &mut CatalogState, svc: &str, id: &str, rev| {
            let (s, i) = (ServiceName::new(svc).unwrap(), InstanceId::new(id).unwrap());
            let inst = instance(svc, id, "10.0.0.1");
            state.put(
                &keys,
                &kv(
                    keys.instance(&s, &i),
                    serde_json::to_vec(&inst).unwrap(),
                    rev,
                ),
            );
        };
        put(&mut state, "user", "u1", 2);
        put(&mut state, "order", "o1", 3);
        let first = state.snapshot();
        put(&mut state, "user", "u2", 4);
        let second = state.snapshot();
        let get = |snap: &Snapshot, svc: &str| {
            snap.services
                .get(&ServiceName::new(svc).unwrap())
                .cloned()
                .unwrap()
        };
        assert!(Arc::ptr_eq(&get(&first, "order"), &get(&second, "order")));
        assert!(!Arc::ptr_eq(&get(&first, "user"), &get(&second, "user")));
        assert_eq!(get(&second, "user").instances.len(), 2);
        assert_eq!(get(&second, "user").index, 4);
        // Removing the last instance removes the service.
        let user = ServiceName::new("user").unwrap();
        for id in ["u1", "u2"] {
            state.delete(
                &keys,
                &keys.instance(&user, &InstanceId::new(id).unwrap()),
                5,
            );
        }
        let third = state.snapshot();
        assert!(third.service(&user).is_none());
        assert!(Arc::ptr_eq(&get(&first, "order"), &get(&third, "order")));
    }

    #[test]
    fn unreadable_records_are_skipped() {
        let keys = Keys::default();
        let user = ServiceName::new("user").unwrap();
        let mut state = CatalogState::new();
        state.put(
            &keys,
            &kv(
                keys.instance(&user, &InstanceId::new("u1").unwrap()),
                b"{oops".to_vec(),
                3,
            ),
        );
        assert!(state.snapshot().services.is_empty());
    }

    /// A catalog of `n` instances of `svc`, each `meta_bytes` of metadata,
    /// written straight to `store`; the bytes written.
    async fn fill(store: &dyn Store, svc: &str, n: usize, meta_bytes: usize) -> usize {
        let keys = Keys::default();
        let name = ServiceName::new(svc).unwrap();
        let mut total = 0;
        for i in 0..n {
            let id = InstanceId::new(&format!("i{i}")).unwrap();
            let meta = (0..meta_bytes / 250)
                .map(|k| (format!("k{k}"), "v".repeat(240)))
                .collect();
            let inst = Registration {
                address: format!("10.1.{}.{}", i / 250, i % 250 + 1),
                port: 80,
                meta,
                ..Default::default()
            }
            .validate(&name, &id)
            .unwrap();
            let json = serde_json::to_vec(&inst).unwrap();
            total += json.len();
            store
                .put(&keys.instance(&name, &id), json, None)
                .await
                .unwrap();
        }
        total
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_catalog_over_4_mib_loads_from_etcd() {
        let etcd = crate::testing::EtcdProcess::spawn().await;
        let store = crate::store::EtcdStore::connect(crate::store::EtcdOptions {
            endpoints: vec![etcd.endpoint()],
            ..Default::default()
        })
        .await
        .unwrap();
        // 300 records of ~15 KB: 4.5 MB, past the 4 MiB that one etcd
        // answer could carry before, and in one page of the default size.
        let bytes = fill(&store, "big", 300, 15_000).await;
        assert!(bytes > 4 * 1024 * 1024, "{bytes} bytes");
        let catalog = Catalog::new(Keys::default());
        let cancel = CancellationToken::new();
        tokio::spawn(catalog.clone().run(Arc::new(store), cancel.clone()));
        assert!(catalog.wait_synced(Duration::from_secs(20)).await);
        let snap = catalog.snapshot();
        let big = snap.service(&ServiceName::new("big").unwrap()).unwrap();
        assert_eq!(big.instances.len(), 300);
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_watcher_compacted_away_reads_the_catalog_again() {
        // A history of 5 writes: 40 writes without yielding leave the
        // catalog's watch behind it, which then says Compacted.
        let store = Arc::new(crate::store::MemoryStore::with_history_limit(5));
        let catalog = Catalog::new(Keys::default());
        let cancel = CancellationToken::new();
        tokio::spawn(catalog.clone().run(store.clone(), cancel.clone()));
        assert!(catalog.wait_synced(Duration::from_secs(5)).await);
        assert_eq!(catalog.loads(), 1);
        fill(&*store, "user", 40, 0).await;
        let user = ServiceName::new("user").unwrap();
        let all = catalog
            .wait_service(&user, Duration::from_secs(10), |snap| {
                snap.service(&user).is_some_and(|s| s.instances.len() == 40)
            })
            .await;
        assert!(all, "the catalog did not catch up after compaction");
        assert!(catalog.loads() >= 2, "no resync: {} loads", catalog.loads());
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_wait_on_one_service_is_woken_by_its_changes_only() {
        let keys = Keys::default();
        let catalog = Catalog::new(keys.clone());
        let mut state = CatalogState::new();
        let put = |state: &mut CatalogState, svc: &str, id: &str, rev| {
            let inst = instance(svc, id, "10.0.0.1");
            let key = keys.instance(&inst.service, &inst.id);
            state.put(&keys, &kv(key, serde_json::to_vec(&inst).unwrap(), rev));
        };
        put(&mut state, "user", "u0", 1);
        catalog.publish(&mut state);
        let looks = std::sync::atomic::AtomicUsize::new(0);
        let user = ServiceName::new("user").unwrap();
        let wait = catalog.wait_service(&user, Duration::from_secs(5), |snap| {
            looks.fetch_add(1, Ordering::Relaxed);
            snap.service(&user).is_some_and(|s| s.instances.len() == 2)
        });
        let changes = async {
            tokio::task::yield_now().await;
            for rev in 2..22 {
                put(&mut state, "order", &format!("o{rev}"), rev);
                catalog.publish(&mut state);
                tokio::task::yield_now().await;
            }
            put(&mut state, "user", "u1", 22);
            catalog.publish(&mut state);
        };
        let (satisfied, ()) = tokio::join!(wait, changes);
        assert!(satisfied);
        let looks = looks.load(Ordering::Relaxed);
        assert!(
            looks <= 3,
            "20 changes to order woke the wait on user: {looks} looks"
        );
        assert!(
            catalog.waiters.lock().unwrap().is_empty(),
            "the waiter's entry stays"
        );
    }

    mod incremental {
        use super::*;
        use proptest::prelude::*;

        /// One change to a small catalog of 3 services × 4 instances.
        #[derive(Debug, Clone)]
        enum Op {
            Register(usize, usize, u8),
            Deregister(usize, usize),
            Health(usize, usize, bool),
            Config(usize, bool),
            Snapshot,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0..3usize, 0..4usize, any::<u8>()).prop_map(|(s, i, a)| Op::Register(s, i, a)),
                (0..3usize, 0..4usize).prop_map(|(s, i)| Op::Deregister(s, i)),
                (0..3usize, 0..4usize, any::<bool>()).prop_map(|(s, i, p)| Op::Health(s, i, p)),
                (0..3usize, any::<bool>()).prop_map(|(s, set)| Op::Config(s, set)),
                Just(Op::Snapshot),
            ]
        }

        fn svc(s: usize) -> ServiceName {
            ServiceName::new(["user", "order", "pay"][s]).unwrap()
        }

        fn id(i: usize) -> InstanceId {
            InstanceId::new(&format!("i{i}")).unwrap()
        }

        /// The snapshot `incremental` published equals one built afresh
        /// from what the store holds (`store`).
        fn same_as_rebuilt(
            incremental: &Snapshot,
            store: &BTreeMap<String, KeyValue>,
            revision: Revision,
        ) -> Result<(), TestCaseError> {
            let keys = Keys::default();
            let mut full = CatalogState::new();
            full.reset(
                &keys,
                &store.values().cloned().collect::<Vec<_>>(),
                revision,
            );
            let rebuilt = full.snapshot();
            let names = |snap: &Snapshot| snap.services.keys().cloned().collect::<Vec<_>>();
            prop_assert_eq!(names(incremental), names(&rebuilt));
            for (name, entry) in &incremental.services {
                let other = &rebuilt.services[name];
                prop_assert_eq!(&entry.instances, &other.instances, "{}", name);
                prop_assert_eq!(&entry.config, &other.config, "{}", name);
                // A deletion moves the index past every remaining key's
                // revision, which a fresh read cannot see.
                prop_assert!(entry.index >= other.index, "{}", name);
            }
            prop_assert_eq!(incremental.instances, rebuilt.instances);
            prop_assert_eq!(incremental.healthy, rebuilt.healthy);
            for (name, index) in &incremental.deleted {
                prop_assert!(!incremental.services.contains_key(name));
                prop_assert!(*index <= incremental.revision);
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            #[test]
            fn incremental_snapshots_equal_a_full_rebuild(ops in proptest::collection::vec(op(), 1..80)) {
                let keys = Keys::default();
                let mut state = CatalogState::new();
                let mut store: BTreeMap<String, KeyValue> = BTreeMap::new();
                let mut rev: Revision = 1;
                let mut published = Vec::new();
                for op in ops {
                    rev += 1;
                    match op {
                        Op::Register(s, i, a) => {
                            let inst = instance(svc(s).as_str(), id(i).as_str(), &format!("10.0.0.{a}"));
                            let kv = kv(keys.instance(&svc(s), &id(i)), serde_json::to_vec(&inst).unwrap(), rev);
                            state.put(&keys, &kv);
                            store.insert(kv.key.clone(), kv);
                        }
                        Op::Deregister(s, i) => {
                            // The API deletes an instance with its health.
                            for key in [keys.instance(&svc(s), &id(i)), keys.health(&svc(s), &id(i))] {
                                if store.remove(&key).is_some() {
                                    state.delete(&keys, &key, rev);
                                }
                            }
                        }
                        Op::Health(s, i, passing) => {
                            // Written only while the instance is there.
                            if !store.contains_key(&keys.instance(&svc(s), &id(i))) {
                                continue;
                            }
                            let health = Health {
                                status: if passing { HealthStatus::Passing } else { HealthStatus::Critical },
                                output: String::new(),
                                since: SystemTime::UNIX_EPOCH,
                            };
                            let kv = kv(keys.health(&svc(s), &id(i)), serde_json::to_vec(&health).unwrap(), rev);
                            state.put(&keys, &kv);
                            store.insert(kv.key.clone(), kv);
                        }
                        Op::Config(s, true) => {
                            let config = ServiceConfig { allow: vec![svc((s + 1) % 3)], ..Default::default() };
                            let kv = kv(keys.config(&svc(s)), serde_json::to_vec(&config).unwrap(), rev);
                            state.put(&keys, &kv);
                            store.insert(kv.key.clone(), kv);
                        }
                        Op::Config(s, false) => {
                            let key = keys.config(&svc(s));
                            if store.remove(&key).is_some() {
                                state.delete(&keys, &key, rev);
                            }
                        }
                        Op::Snapshot => {
                            let snap = state.snapshot();
                            same_as_rebuilt(&snap, &store, rev)?;
                            published.push(snap);
                        }
                    }
                }
                let last = state.snapshot();
                same_as_rebuilt(&last, &store, rev)?;
                // Unchanged services are shared with the previous snapshot.
                if let Some(previous) = published.last() {
                    for (name, entry) in &last.services {
                        if let Some(old) = previous.services.get(name)
                            && old.index == entry.index
                        {
                            prop_assert!(Arc::ptr_eq(old, entry), "{} rebuilt without a change", name);
                        }
                    }
                }
            }
        }
    }
}
