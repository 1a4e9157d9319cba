//! The store: a small key-value interface with etcd's semantics (revisions,
//! leases, watches, elections), implemented by etcd ([`EtcdStore`]) for
//! production and in process ([`MemoryStore`]) for `--dev`.
//!
//! Both pass one conformance suite (`conformance.rs`), so code above this
//! module can rely on the same behaviour from either.

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use tokio_util::sync::CancellationToken;

mod etcd;
mod keys;
mod memory;

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;

pub use etcd::{EtcdCredentials, EtcdOptions, EtcdStore, EtcdTls};
pub use keys::{KeyKind, Keys};
pub use memory::MemoryStore;

/// A store revision: etcd's cluster-wide counter, bumped by every write.
pub type Revision = i64;

/// A lease id. Keys put under a lease vanish when it expires or is revoked.
pub type LeaseId = i64;

/// One key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The full key.
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// Revision of the write that created it.
    pub create_revision: Revision,
    /// Revision of its last write.
    pub mod_revision: Revision,
    /// The lease it lives under, if any.
    pub lease: Option<LeaseId>,
}

/// A consistent read of every key under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeResult {
    /// Keys in key order.
    pub kvs: Vec<KeyValue>,
    /// The store revision the read saw.
    pub revision: Revision,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or changed.
    Put(KeyValue),
    /// A key was deleted (explicitly, or by lease expiry or revocation).
    Delete {
        /// The key.
        key: String,
        /// Revision of the deletion.
        mod_revision: Revision,
    },
}

/// The events of one or more revisions, delivered together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    /// Highest revision covered by this batch.
    pub revision: Revision,
    /// Events in revision order.
    pub events: Vec<WatchEvent>,
}

/// A stream of watch batches. It ends (or yields an error) when the watch is
/// lost; the caller then reads the range again and watches anew.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, StoreError>> + Send>>;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No endpoint of the store could be reached.
    #[error("the store is unreachable: {0}")]
    Unavailable(String),
    /// The operation did not finish in time (the store is slow or partitioned).
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// The lease has expired or was revoked.
    #[error("lease {0:x} not found: it expired or was revoked")]
    LeaseNotFound(LeaseId),
    /// A watch asked for a revision the store has compacted away.
    #[error("revision {requested} has been compacted (oldest kept: {compact_revision})")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision still available.
        compact_revision: Revision,
    },
    /// An answer was larger than the client takes.
    #[error("the store's answer was too large: {0}")]
    TooLarge(String),
    /// Anything else the store reported.
    #[error("store error: {0}")]
    Other(String),
}

impl StoreError {
    /// Whether the failure means "the store cannot be reached now" (as
    /// opposed to a refusal of this particular request). The API answers 503
    /// for these.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Timeout(_))
    }
}

/// Held leadership of an election. Dropping it resigns.
pub struct Leadership {
    /// Cancelled when leadership is lost (the lease could not be kept alive,
    /// or the store went away). The holder must stop acting as leader.
    pub lost: CancellationToken,
    /// Resigns on drop.
    _guard: Box<dyn Send + Sync>,
}

impl Leadership {
    /// Builds a leadership whose `guard` resigns when dropped.
    pub fn new(lost: CancellationToken, guard: Box<dyn Send + Sync>) -> Self {
        Self {
            lost,
            _guard: guard,
        }
    }
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("lost", &self.lost.is_cancelled())
            .finish()
    }
}

/// A key-value store with etcd's semantics.
///
/// Every method is bounded in time: an implementation answers
/// [`StoreError::Unavailable`] or [`StoreError::Timeout`] within a few
/// seconds when the store cannot be reached, never hangs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Reads every key under `prefix`, with the revision of the read.
    /// Collects [`Store::range_pages`]; for large prefixes, use that.
    async fn range(&self, prefix: &str) -> Result<RangeResult, StoreError> {
        let mut kvs = Vec::new();
        let revision = self
            .range_pages(prefix, &mut |page| kvs.extend(page))
            .await?;
        Ok(RangeResult { kvs, revision })
    }

    /// Reads every key under `prefix` as one consistent read at one
    /// revision, handing the keys to `each` a page at a time in key order,
    /// so that no single answer (etcd's are limited to a few MiB) and no
    /// single buffer holds the whole prefix. Returns the revision. A read
    /// whose revision is compacted before its last page gives
    /// [`StoreError::Compacted`]; `each` has then seen part of the keys,
    /// and the caller starts again.
    async fn range_pages(
        &self,
        prefix: &str,
        each: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision, StoreError>;

    /// Writes `key`, under `lease` if given. Returns the new revision.
    /// A lease that does not exist gives [`StoreError::LeaseNotFound`].
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError>;

    /// Writes `key` only if `guard` exists, atomically. Returns whether it
    /// wrote. Used so that a health result never outlives its instance.
    async fn put_if_present(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        guard: &str,
    ) -> Result<bool, StoreError>;

    /// Deletes the keys, atomically. Returns how many existed.
    async fn delete(&self, keys: &[String]) -> Result<usize, StoreError>;

    /// Grants a lease. `ttl` is rounded up to whole seconds (at least one).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews a lease once; returns the TTL it was renewed to.
    /// An expired or revoked lease gives [`StoreError::LeaseNotFound`].
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;

    /// Revokes a lease, deleting every key under it. Revoking a lease that is
    /// already gone is not an error.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Watches every key under `prefix`, starting at revision `from`
    /// (inclusive). A compacted `from` gives [`StoreError::Compacted`], either
    /// at once or as the stream's first item.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;

    /// Compacts history up to `revision`.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// Campaigns in election `name` as `candidate`, waiting until elected.
    /// Leadership lives under a lease of `ttl`, kept alive in the background.
    async fn campaign(
        &self,
        name: &str,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Leadership, StoreError>;

    /// Checks that the store answers; returns its current revision.
    async fn ping(&self) -> Result<Revision, StoreError>;
}

/// Campaigns in election `name` as `candidate` and runs `work` while
/// elected, until `cancel` fires: when leadership is lost, `work` is
/// dropped and the campaign starts again. `role` names the job in logs.
pub async fn while_leading<F, Fut>(
    store: &dyn Store,
    name: &str,
    candidate: &str,
    ttl: Duration,
    role: &'static str,
    cancel: &CancellationToken,
    mut work: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
    loop {
        let leadership = tokio::select! {
            _ = cancel.cancelled() => return,
            l = store.campaign(name, candidate, ttl) => l,
        };
        match leadership {
            Ok(leadership) => {
                backoff.reset();
                tracing::info!(%candidate, "{role} elected");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = leadership.lost.cancelled() => tracing::warn!("{role} lost leadership"),
                    _ = work() => {}
                }
            }
            Err(err) => {
                // The store logs losing and regaining etcd once; a warning
                // per retry would repeat it every second of an outage.
                if err.is_unavailable() {
                    tracing::debug!(%err, "{role} campaign failed; retrying");
                } else {
                    tracing::warn!(%err, "{role} campaign failed; retrying");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_wait()) => {}
                }
                continue;
            }
        }
    }
}

/// Exponential backoff with jitter, for loops that retry a store that
/// cannot be reached: each wait doubles up to `max`, and is drawn between
/// half of it and all of it, so that replicas (and the tasks of one
/// replica) that lost etcd together do not all come back in the same
/// instant.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `first`, doubling up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The wait before the next retry; later waits are longer.
    pub fn next_wait(&mut self) -> Duration {
        let full = self.next;
        self.next = (self.next * 2).min(self.max);
        jitter(full)
    }

    /// Back to the first wait, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A duration drawn uniformly between half of `full` and `full`.
pub(crate) fn jitter(full: Duration) -> Duration {
    let half = full / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// Rounds a TTL up to whole seconds, at least one (etcd leases count seconds).
pub fn lease_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let waits: Vec<Duration> = (0..8).map(|_| b.next_wait()).collect();
        let full = [100u64, 200, 400, 800, 1600, 2000, 2000, 2000];
        for (wait, full) in waits.iter().zip(full) {
            let full = Duration::from_millis(full);
            assert!(*wait >= full / 2 && *wait <= full, "{wait:?} for {full:?}");
        }
        // Jitter: eight draws are not all the same fraction of their step.
        let fractions: Vec<u128> = waits
            .iter()
            .zip(full)
            .map(|(w, f)| w.as_micros() * 1000 / u128::from(f * 1000))
            .collect();
        assert!(fractions.windows(2).any(|w| w[0] != w[1]), "{fractions:?}");
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }
}
