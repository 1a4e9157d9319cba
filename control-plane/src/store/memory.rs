//! The in-process store behind `signpost server --dev` and unit tests: etcd's
//! semantics without etcd.
//!
//! One mutex guards the whole state and is never held across an `.await`.
//! Every write that changes something bumps one global revision (a
//! multi-key delete or a lease expiry is one revision, as one etcd txn is),
//! appends its events to a bounded history and wakes waiters through a
//! `tokio::sync::watch` channel. Watchers *pull* their events from that
//! history, so a slow watcher costs no memory, and one that falls behind the
//! history gets [`StoreError::Compacted`] exactly like an etcd watcher.
//!
//! Leases expire lazily at every operation (so a keep-alive one millisecond
//! late is refused, as etcd would) and by a reaper task spawned with the
//! first lease (so an expiry produces its Delete events even when nothing
//! else happens). Time is `tokio::time::Instant`, so tests may pause it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    KeyValue, Leadership, LeaseId, Revision, Store, StoreError, WatchBatch, WatchEvent,
    WatchStream, lease_seconds,
};

/// How many events the store keeps for watches that start in the past.
///
/// 10 000 covers minutes of churn of a large dev fleet, so a watcher that
/// reconnects replays instead of re-reading everything, while the memory it
/// costs stays a few megabytes. Older revisions count as compacted.
pub const HISTORY_LIMIT: usize = 10_000;

/// An in-memory store with etcd's semantics: revisions, leases, watches
/// with history, compaction and elections.
///
/// Cloning gives another handle to the same store.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("MemoryStore")
            .field("revision", &state.revision)
            .field("keys", &state.kvs.len())
            .field("leases", &state.leases.len())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// State shared by the store handles, its watch streams and its tasks.
struct Shared {
    state: Mutex<State>,
    /// The latest revision; watchers and campaigners wait for it to change.
    revision_tx: watch::Sender<Revision>,
    /// Wakes the reaper when a lease that may expire sooner appears, and
    /// when the store is dropped.
    reaper_wake: Arc<Notify>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The reaper only holds a weak reference; wake it so it sees the
        // store is gone and ends instead of sleeping forever.
        self.reaper_wake.notify_one();
    }
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct State {
    /// The current revision: that of the last write (0 before any).
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    /// Events of the kept revisions, oldest first.
    history: VecDeque<(Revision, WatchEvent)>,
    history_limit: usize,
    /// The oldest revision a watch may start from; earlier ones are
    /// compacted (explicitly, or pushed out of the bounded history).
    first_kept: Revision,
    reaper_started: bool,
}

impl State {
    fn new(history_limit: usize) -> Self {
        Self {
            revision: 0,
            kvs: BTreeMap::new(),
            leases: HashMap::new(),
            next_lease: 1,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            first_kept: 1,
            reaper_started: false,
        }
    }

    /// Applies a put at revision `rev` (not yet committed) and returns its event.
    fn apply_put(
        &mut self,
        rev: Revision,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> WatchEvent {
        let old = self.kvs.get(key).map(|kv| (kv.create_revision, kv.lease));
        let create_revision = match old {
            Some((created, old_lease)) => {
                // A put without a lease detaches the key from its old lease,
                // as in etcd.
                if old_lease != lease {
                    self.detach(key, old_lease);
                }
                created
            }
            None => rev,
        };
        if let Some(id) = lease
            && let Some(l) = self.leases.get_mut(&id)
        {
            l.keys.insert(key.to_string());
        }
        let kv = KeyValue {
            key: key.to_string(),
            value,
            create_revision,
            mod_revision: rev,
            lease,
        };
        self.kvs.insert(key.to_string(), kv.clone());
        WatchEvent::Put(kv)
    }

    /// Applies a delete at revision `rev`; `None` when the key did not exist.
    fn apply_delete(&mut self, rev: Revision, key: &str) -> Option<WatchEvent> {
        let old = self.kvs.remove(key)?;
        self.detach(key, old.lease);
        Some(WatchEvent::Delete {
            key: key.to_string(),
            mod_revision: rev,
        })
    }

    fn detach(&mut self, key: &str, lease: Option<LeaseId>) {
        if let Some(id) = lease
            && let Some(l) = self.leases.get_mut(&id)
        {
            l.keys.remove(key);
        }
    }

    /// Commits the events of one write as revision `revision + 1`. A write
    /// that changed nothing does not take a revision, as in etcd.
    fn commit(&mut self, events: Vec<WatchEvent>) {
        if events.is_empty() {
            return;
        }
        self.revision += 1;
        let rev = self.revision;
        self.history.extend(events.into_iter().map(|e| (rev, e)));
        if self.history.len() > self.history_limit {
            // Drop whole revisions only: a watcher must see all events of a
            // revision or none.
            let mut dropped = None;
            while self.history.len() > self.history_limit {
                dropped = self.history.pop_front().map(|(r, _)| r);
            }
            if let Some(r) = dropped {
                while self.history.front().is_some_and(|(front, _)| *front == r) {
                    self.history.pop_front();
                }
                self.first_kept = self.first_kept.max(r + 1);
            }
        }
    }

    /// Deletes every key of `lease` in one revision and forgets the lease.
    fn drop_lease(&mut self, lease: LeaseId) -> bool {
        let Some(l) = self.leases.remove(&lease) else {
            return false;
        };
        let rev = self.revision + 1;
        let events = l
            .keys
            .iter()
            .filter_map(|k| self.apply_delete(rev, k))
            .collect();
        self.commit(events);
        true
    }

    /// Expires every lease whose deadline has passed, earliest first.
    fn expire(&mut self, now: Instant) {
        let mut expired: Vec<(Instant, LeaseId)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, l)| (l.deadline, *id))
            .collect();
        expired.sort_unstable();
        for (_, id) in expired {
            tracing::debug!(lease = id, "lease expired");
            self.drop_lease(id);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }

    fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        if let Some(id) = lease
            && !self.leases.contains_key(&id)
        {
            return Err(StoreError::LeaseNotFound(id));
        }
        let event = self.apply_put(self.revision + 1, key, value, lease);
        self.commit(vec![event]);
        Ok(self.revision)
    }

    fn range(&self, prefix: &str) -> Vec<KeyValue> {
        self.kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect()
    }

    /// The events under `prefix` from revision `from` on, or `Compacted`
    /// when `from` is older than the history.
    fn events_since(
        &self,
        prefix: &str,
        from: Revision,
    ) -> Result<Vec<(Revision, WatchEvent)>, StoreError> {
        if from < self.first_kept {
            return Err(StoreError::Compacted {
                requested: from,
                compact_revision: self.first_kept,
            });
        }
        let start = self.history.partition_point(|(r, _)| *r < from);
        Ok(self
            .history
            .range(start..)
            .filter(|(_, e)| event_key(e).starts_with(prefix))
            .cloned()
            .collect())
    }
}

fn event_key(e: &WatchEvent) -> &str {
    match e {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied write
        // behind (writes build their events before committing), so keep
        // serving rather than cascading the panic into every caller.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the state after expiring due leases, then wakes waiters
    /// if the revision moved. Every operation goes through here.
    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (out, before, after) = {
            let mut state = self.lock();
            let before = state.revision;
            state.expire(Instant::now());
            let out = f(&mut state);
            (out, before, state.revision)
        };
        if after != before {
            self.revision_tx.send_replace(after);
        }
        out
    }
}

impl MemoryStore {
    /// An empty store. Needs no runtime; the lease reaper starts with the
    /// first lease.
    pub fn new() -> Self {
        Self::with_history_limit(HISTORY_LIMIT)
    }

    /// An empty store that keeps the events of at most `limit` (at least 1)
    /// past writes for watches; tests use a small one to reach compaction.
    pub fn with_history_limit(limit: usize) -> Self {
        let (revision_tx, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::new(limit)),
                revision_tx,
                reaper_wake: Arc::new(Notify::new()),
            }),
        }
    }

    /// Starts the reaper on the first lease (we are inside the runtime then).
    fn ensure_reaper(&self) {
        let start = {
            let mut state = self.shared.lock();
            !std::mem::replace(&mut state.reaper_started, true)
        };
        if start {
            let weak = Arc::downgrade(&self.shared);
            let wake = self.shared.reaper_wake.clone();
            tokio::spawn(reap(weak, wake));
        }
        self.shared.reaper_wake.notify_one();
    }
}

/// Expires leases on time, so their Delete events appear even when no one
/// touches the store. Holds the store weakly so it never keeps it alive.
async fn reap(store: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next = match store.upgrade() {
            Some(shared) => shared.with_state(|s| s.next_deadline()),
            None => return,
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// Where one watch stream is: the next revision it will deliver.
struct WatchCursor {
    shared: Arc<Shared>,
    rx: watch::Receiver<Revision>,
    prefix: String,
    next: Revision,
    /// Set after an error: the stream ends after yielding it.
    done: bool,
}

impl WatchCursor {
    async fn next_batch(mut self) -> Option<(Result<WatchBatch, StoreError>, Self)> {
        if self.done {
            return None;
        }
        loop {
            // Mark the current revision seen *before* reading, so a write
            // landing after the read still wakes us.
            self.rx.borrow_and_update();
            let events = self
                .shared
                .with_state(|s| s.events_since(&self.prefix, self.next));
            match events {
                Err(e) => {
                    self.done = true;
                    return Some((Err(e), self));
                }
                Ok(events) if !events.is_empty() => {
                    let revision = events.last().map_or(self.next, |(r, _)| *r);
                    self.next = revision + 1;
                    let batch = WatchBatch {
                        revision,
                        events: events.into_iter().map(|(_, e)| e).collect(),
                    };
                    return Some((Ok(batch), self));
                }
                Ok(_) => {
                    // The sender lives in `shared`, which we hold: it
                    // cannot be dropped, so an error cannot happen.
                    if self.rx.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    }
}

/// Leadership in a memory election: the candidate's lease. Dropping it
/// stops the keep-alive and revokes the lease, which deletes the candidate
/// key and lets the next candidate in.
struct Candidacy {
    shared: Arc<Shared>,
    lease: LeaseId,
    stop: CancellationToken,
}

impl Drop for Candidacy {
    fn drop(&mut self) {
        self.stop.cancel();
        // Synchronous: resigning needs no runtime in memory.
        self.shared.with_state(|s| s.drop_lease(self.lease));
    }
}

/// Renews `lease` every third of `ttl` until `stop`; cancels `lost` if the
/// lease has vanished.
async fn keep_candidate_alive(
    store: Weak<Shared>,
    lease: LeaseId,
    ttl: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let Some(shared) = store.upgrade() else {
            lost.cancel();
            return;
        };
        let alive = shared.with_state(|s| match s.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                true
            }
            None => false,
        });
        if !alive {
            tracing::warn!(lease, "election lease vanished; leadership lost");
            lost.cancel();
            return;
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.shared.with_state(|s| s.kvs.get(key).cloned()))
    }

    /// One page: the whole prefix, copied under the state's lock, is
    /// already one consistent read, and there is no message size to keep
    /// under.
    async fn range_pages(
        &self,
        prefix: &str,
        each: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision, StoreError> {
        let (kvs, revision) = self.shared.with_state(|s| (s.range(prefix), s.revision));
        each(kvs);
        Ok(revision)
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        self.shared.with_state(|s| s.put(key, value, lease))
    }

    async fn put_if_present(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        guard: &str,
    ) -> Result<bool, StoreError> {
        self.shared.with_state(|s| {
            if !s.kvs.contains_key(guard) {
                return Ok(false);
            }
            s.put(key, value, lease).map(|_| true)
        })
    }

    async fn delete(&self, keys: &[String]) -> Result<usize, StoreError> {
        Ok(self.shared.with_state(|s| {
            let rev = s.revision + 1;
            let unique: BTreeSet<&String> = keys.iter().collect();
            let events: Vec<WatchEvent> = unique
                .into_iter()
                .filter_map(|k| s.apply_delete(rev, k))
                .collect();
            let n = events.len();
            s.commit(events);
            n
        }))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl = Duration::from_secs(lease_seconds(ttl).unsigned_abs());
        let id = self.shared.with_state(|s| {
            let id = s.next_lease;
            s.next_lease += 1;
            s.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: BTreeSet::new(),
                },
            );
            id
        });
        self.ensure_reaper();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.shared
            .with_state(|s| match s.leases.get_mut(&lease) {
                Some(l) => {
                    l.deadline = Instant::now() + l.ttl;
                    Some(l.ttl)
                }
                None => None,
            })
            .ok_or(StoreError::LeaseNotFound(lease))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.shared.with_state(|s| s.drop_lease(lease));
        Ok(())
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let rx = self.shared.revision_tx.subscribe();
        let from = self.shared.with_state(|s| {
            // etcd reads a start revision of 0 as "from now on".
            let from = if from <= 0 { s.revision + 1 } else { from };
            if from < s.first_kept {
                return Err(StoreError::Compacted {
                    requested: from,
                    compact_revision: s.first_kept,
                });
            }
            Ok(from)
        })?;
        let cursor = WatchCursor {
            shared: self.shared.clone(),
            rx,
            prefix: prefix.to_string(),
            next: from,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            cursor,
            WatchCursor::next_batch,
        )))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.shared.with_state(|s| {
            if revision > s.revision {
                return Err(StoreError::Other(format!(
                    "cannot compact revision {revision}: the current revision is {}",
                    s.revision
                )));
            }
            if revision > s.first_kept {
                s.first_kept = revision;
                let keep_from = s.history.partition_point(|(r, _)| *r < revision);
                s.history.drain(..keep_from);
            }
            Ok(())
        })
    }

    async fn campaign(
        &self,
        name: &str,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Leadership, StoreError> {
        let lease = self.grant_lease(ttl).await?;
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        // From here on, dropping `candidacy` (an error, or the caller giving
        // up on the campaign) withdraws the candidate.
        let candidacy = Candidacy {
            shared: self.shared.clone(),
            lease,
            stop: stop.clone(),
        };
        tokio::spawn(keep_candidate_alive(
            Arc::downgrade(&self.shared),
            lease,
            Duration::from_secs(lease_seconds(ttl).unsigned_abs()),
            lost.clone(),
            stop,
        ));
        // The same key shape as etcd's election API: `<name>/<lease hex>`;
        // the lowest create revision under `<name>/` leads.
        let election_prefix = format!("{name}/");
        let key = format!("{election_prefix}{lease:x}");
        self.put(&key, candidate.as_bytes().to_vec(), Some(lease))
            .await?;
        let mut rx = self.shared.revision_tx.subscribe();
        loop {
            rx.borrow_and_update();
            let leader = self.shared.with_state(|s| {
                if !s.kvs.contains_key(&key) {
                    return Err(StoreError::LeaseNotFound(lease));
                }
                Ok(s.range(&election_prefix)
                    .into_iter()
                    .min_by_key(|kv| kv.create_revision)
                    .map(|kv| kv.key))
            })?;
            if leader.as_deref() == Some(key.as_str()) {
                tracing::debug!(election = name, candidate, "elected");
                return Ok(Leadership::new(lost, Box::new(candidacy)));
            }
            // The store outlives this call (we hold it), so the sender
            // cannot be gone; an error would only mean "re-check".
            let _ = rx.changed().await;
        }
    }

    async fn ping(&self) -> Result<Revision, StoreError> {
        Ok(self.shared.with_state(|s| s.revision))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    crate::store_conformance_tests!(MemoryStore::new());

    #[tokio::test(start_paused = true)]
    async fn lease_expires_exactly_at_its_ttl() {
        let store = MemoryStore::new();
        let lease = store
            .grant_lease(Duration::from_millis(1500))
            .await
            .unwrap();
        let rev = store.put("/k", vec![], Some(lease)).await.unwrap();
        let mut watch = store.watch("/", rev + 1).await.unwrap();

        // Rounded up to 2 s, like etcd's whole seconds.
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(store.get("/k").await.unwrap().is_some());
        tokio::time::advance(Duration::from_millis(1)).await;

        // The reaper, not a read, produces the Delete.
        let batch = watch.next().await.unwrap().unwrap();
        assert_eq!(
            batch.events,
            vec![WatchEvent::Delete {
                key: "/k".into(),
                mod_revision: rev + 1
            }]
        );
        assert_eq!(
            store.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(lease))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_renews_to_the_full_ttl() {
        let store = MemoryStore::new();
        let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
        store.put("/k", vec![], Some(lease)).await.unwrap();
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(store.keep_alive(lease).await, Ok(Duration::from_secs(2)));
        tokio::time::advance(Duration::from_millis(1900)).await;
        assert!(store.get("/k").await.unwrap().is_some());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(store.get("/k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn expiry_of_several_keys_is_one_revision() {
        let store = MemoryStore::new();
        let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
        store.put("/a", vec![], Some(lease)).await.unwrap();
        let before = store.put("/b", vec![], Some(lease)).await.unwrap();
        // Re-putting without the lease detaches the key, as in etcd.
        let detached = store.put("/c", vec![], Some(lease)).await.unwrap();
        store.put("/c", vec![], None).await.unwrap();
        assert!(detached > before);
        store.revoke_lease(lease).await.unwrap();
        assert_eq!(store.ping().await.unwrap(), detached + 2);
        assert!(store.get("/c").await.unwrap().is_some());
        // A write that changes nothing takes no revision.
        store.delete(&["/missing".into()]).await.unwrap();
        store.revoke_lease(lease).await.unwrap();
        assert_eq!(store.ping().await.unwrap(), detached + 2);
    }

    #[tokio::test]
    async fn history_is_bounded_and_older_revisions_are_compacted() {
        let store = MemoryStore::with_history_limit(3);
        for i in 0..5u8 {
            store.put("/k", vec![i], None).await.unwrap();
        }
        // Revisions 1..=5; only 3..=5 are kept.
        let err = match store.watch("/", 2).await {
            Err(e) => e,
            Ok(_) => panic!("watch from a dropped revision succeeded"),
        };
        assert_eq!(
            err,
            StoreError::Compacted {
                requested: 2,
                compact_revision: 3
            }
        );
        let mut watch = store.watch("/", 3).await.unwrap();
        let batch = watch.next().await.unwrap().unwrap();
        assert_eq!(batch.revision, 5);
        assert_eq!(batch.events.len(), 3);
    }

    #[tokio::test]
    async fn a_watcher_left_behind_gets_compacted() {
        let store = MemoryStore::with_history_limit(2);
        let mut watch = store.watch("/", 1).await.unwrap();
        for i in 0..4u8 {
            store.put("/k", vec![i], None).await.unwrap();
        }
        assert!(matches!(
            watch.next().await,
            Some(Err(StoreError::Compacted { requested: 1, .. }))
        ));
        assert!(
            watch.next().await.is_none(),
            "the stream ends after the error"
        );
    }

    #[tokio::test]
    async fn giving_up_a_campaign_withdraws_the_candidate() {
        let store = MemoryStore::new();
        let leader = store
            .campaign("/e", "a", Duration::from_secs(5))
            .await
            .unwrap();
        let waiting = tokio::time::timeout(
            Duration::from_millis(100),
            store.campaign("/e", "b", Duration::from_secs(5)),
        )
        .await;
        assert!(waiting.is_err());
        // Only the leader's key is left.
        assert_eq!(store.range("/e/").await.unwrap().kvs.len(), 1);
        drop(leader);
        assert!(store.range("/e/").await.unwrap().kvs.is_empty());
    }
}
