//! etcd history compaction: one elected control plane compacts the store's
//! history to a retention, so that etcd's database stops growing with every
//! write ever made and never reaches its quota (after which etcd refuses
//! writes).
//!
//! The leader samples the store's revision every tenth of the retention and
//! compacts to the newest sample at least `retention` old — what the
//! Kubernetes API server does every five minutes and etcd's own
//! `--auto-compaction-mode=periodic` does, here done by Signpost so that a
//! deployment does not depend on how etcd was started. A newly elected
//! leader has no samples yet, so it first compacts one retention after its
//! election: leadership changes only ever keep more history, never less.
//!
//! Compaction frees history, not disk space: etcd's file shrinks only with
//! `etcdctl defrag` (see the README).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::{Keys, Revision, Store};

/// Name of the election.
pub const ELECTION: &str = "compactor";

/// TTL of the compactor's leadership lease.
const LEADER_TTL: Duration = Duration::from_secs(10);

/// Compacts history older than a retention while elected.
pub struct Compactor {
    store: Arc<dyn Store>,
    keys: Keys,
    candidate: String,
    retention: Duration,
    period: Duration,
}

impl Compactor {
    /// A compactor keeping `retention` of history, named `candidate` in
    /// the election. It samples every tenth of the retention (at least a
    /// second), so the history kept is between one retention and 1.1 of it.
    pub fn new(store: Arc<dyn Store>, keys: Keys, candidate: String, retention: Duration) -> Self {
        Self {
            store,
            keys,
            candidate,
            retention,
            period: (retention / 10).max(Duration::from_secs(1)),
        }
    }

    /// Samples every `period` instead (for tests).
    pub fn with_period(mut self, period: Duration) -> Self {
        self.period = period;
        self
    }

    /// Campaigns, and compacts while leading, until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let election = self.keys.election(ELECTION);
        crate::store::while_leading(
            &*self.store,
            &election,
            &self.candidate,
            LEADER_TTL,
            "etcd compactor",
            &cancel,
            || self.compact_while_leading(),
        )
        .await;
    }

    async fn compact_while_leading(&self) {
        let mut samples = Samples::default();
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            match self.store.ping().await {
                Ok(revision) => samples.push(now, revision),
                Err(err) => {
                    tracing::debug!(%err, "compactor: no revision sample");
                    continue;
                }
            }
            let Some(target) = samples.due(now, self.retention) else {
                continue;
            };
            match self.store.compact(target).await {
                Ok(()) => tracing::info!(revision = target, "etcd history compacted"),
                // Compacted already (by etcd's own auto-compaction, or an
                // operator): nothing lost, the next sample goes on.
                Err(err) => tracing::warn!(revision = target, %err, "etcd compaction failed"),
            }
        }
    }
}

/// Revision samples, oldest first.
#[derive(Debug, Default)]
struct Samples {
    taken: VecDeque<(Instant, Revision)>,
    compacted: Revision,
}

impl Samples {
    fn push(&mut self, at: Instant, revision: Revision) {
        self.taken.push_back((at, revision));
    }

    /// The revision to compact to now: the newest sample at least
    /// `retention` old, if it is past the last compaction. Older samples
    /// are dropped.
    fn due(&mut self, now: Instant, retention: Duration) -> Option<Revision> {
        let mut target = None;
        while let Some(&(at, revision)) = self.taken.front() {
            if now.duration_since(at) < retention {
                break;
            }
            target = Some(revision);
            self.taken.pop_front();
        }
        let target = target.filter(|r| *r > self.compacted)?;
        self.compacted = target;
        Some(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EtcdOptions, EtcdStore, StoreError};
    use crate::testing::{EtcdProcess, eventually};

    #[test]
    fn compacts_to_the_newest_sample_a_retention_old() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let hour = Duration::from_secs(3600);
        let mut samples = Samples::default();
        for (s, rev) in [(0, 10), (360, 20), (720, 30)] {
            samples.push(at(s), rev);
        }
        assert_eq!(samples.due(at(720), hour), None, "nothing an hour old");
        assert_eq!(samples.due(at(3600), hour), Some(10));
        assert_eq!(samples.due(at(3601), hour), None, "10 is done");
        assert_eq!(samples.due(at(4400), hour), Some(30), "the newest due");
        samples.push(at(4400), 30);
        assert_eq!(
            samples.due(at(9000), hour),
            None,
            "no writes since: nothing new to compact"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_elected_compactor_compacts_etcd_history_past_the_retention() {
        let etcd = EtcdProcess::spawn().await;
        let store: Arc<dyn Store> = Arc::new(
            EtcdStore::connect(EtcdOptions {
                endpoints: vec![etcd.endpoint()],
                ..Default::default()
            })
            .await
            .unwrap(),
        );
        let old = store.put("/history/k", vec![1], None).await.unwrap();
        store.put("/history/k", vec![2], None).await.unwrap();
        let cancel = CancellationToken::new();
        for name in ["a", "b"] {
            let compactor = Compactor::new(
                store.clone(),
                Keys::default(),
                name.into(),
                Duration::from_millis(500),
            )
            .with_period(Duration::from_millis(100));
            tokio::spawn(compactor.run(cancel.clone()));
        }
        let compacted = eventually(Duration::from_secs(10), Duration::from_millis(100), || {
            let store = store.clone();
            async move {
                match store.watch("/history/", old).await {
                    Err(StoreError::Compacted { .. }) => true,
                    Ok(mut stream) => {
                        use futures::StreamExt;
                        let first = tokio::time::timeout(Duration::from_millis(200), stream.next());
                        matches!(first.await, Ok(Some(Err(StoreError::Compacted { .. }))))
                    }
                    Err(_) => false,
                }
            }
        })
        .await;
        assert!(compacted, "revision {old} still in etcd's history");
        // The current value is kept: compaction drops history only.
        let kv = store.get("/history/k").await.unwrap().unwrap();
        assert_eq!(kv.value, vec![2]);
        cancel.cancel();
    }
}
