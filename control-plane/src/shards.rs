//! The health checks shared among control-plane replicas, through etcd.
//!
//! Checked instances fall into [`SHARDS`] shards by a hash of their name.
//! Every replica registers itself as a member under `<prefix>checkers/`
//! with a lease of [`SHARD_TTL`]. Each shard has one preferred member among
//! the live ones, by rendezvous hashing (the member whose hash with the
//! shard is highest), so a member joining or leaving moves only the shards
//! it gains or loses. A replica campaigns in a shard's election
//! (`election/health-checker/<shard>`) only for the shards it prefers, and
//! checks only those whose election it won: the election, not the hashing,
//! makes a shard checked by one replica at a time, whatever each replica
//! believes about the others.
//!
//! When a replica dies its membership and its elections go with their
//! leases, within [`SHARD_TTL`]; the survivors see it gone at their next
//! poll ([`POLL`]), prefer its shards and win them. A replica that cannot
//! reach etcd loses its elections the same way and stops checking.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::store::{Keys, Leadership, LeaseId, Store, StoreError};

/// Shards of the checked instances: enough that a few replicas get even
/// shares, few enough that each replica's elections stay cheap to keep.
pub const SHARDS: u16 = 32;

/// Lease of a membership and of a shard's election: how long a dead
/// replica keeps its shards.
pub const SHARD_TTL: Duration = Duration::from_secs(2);

/// How often a replica renews its membership and reads the members.
pub const POLL: Duration = Duration::from_millis(500);

/// FNV-1a, finished with MurmurHash3's mixer so that names differing in one
/// byte get unrelated hashes (rendezvous hashing compares whole hashes):
/// the same on every replica and every build, which the standard hasher
/// does not promise.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &byte in *part {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// A hash of an instance's name: its shard, and where its probes fall in
/// their interval.
pub fn instance_hash(svc: &str, id: &str) -> u64 {
    fnv1a(&[svc.as_bytes(), id.as_bytes()])
}

/// The shard of an instance.
pub fn shard_of(svc: &str, id: &str) -> u16 {
    (instance_hash(svc, id) % u64::from(SHARDS)) as u16
}

/// The shards `me` prefers among `members`.
pub fn preferred(members: &[String], me: &str) -> BTreeSet<u16> {
    (0..SHARDS)
        .filter(|shard| {
            let score = |m: &String| fnv1a(&[m.as_bytes(), &shard.to_be_bytes()]);
            members
                .iter()
                .max_by(|a, b| score(a).cmp(&score(b)).then_with(|| a.cmp(b)))
                .is_some_and(|owner| owner == me)
        })
        .collect()
}

/// Holds this replica's shards: its membership, and the elections of the
/// shards it prefers.
pub struct ShardHolder {
    store: Arc<dyn Store>,
    keys: Keys,
    candidate: String,
}

impl ShardHolder {
    /// A holder for member `candidate` (unique among the replicas).
    pub fn new(store: Arc<dyn Store>, keys: Keys, candidate: String) -> Self {
        Self {
            store,
            keys,
            candidate,
        }
    }

    /// Keeps the membership and the elections until `cancel` fires,
    /// publishing the shards held to `held` as they change.
    pub async fn run(self, held: watch::Sender<BTreeSet<u16>>, cancel: CancellationToken) {
        let member_key = format!("{}{}", self.keys.checkers(), self.candidate);
        let mut membership: Option<LeaseId> = None;
        let mut leaders: HashMap<u16, Leadership> = HashMap::new();
        let mut campaigns: HashMap<u16, JoinHandle<()>> = HashMap::new();
        let (won_tx, mut won_rx) = mpsc::unbounded_channel::<(u16, Leadership)>();
        let mut reachable = true;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                Some((shard, leadership)) = won_rx.recv() => {
                    campaigns.remove(&shard);
                    leaders.insert(shard, leadership);
                    publish(&held, &leaders);
                    continue;
                }
            }
            // Wins not yet taken in: a finished campaign must not look like
            // a failed one below and be started again.
            while let Ok((shard, leadership)) = won_rx.try_recv() {
                campaigns.remove(&shard);
                leaders.insert(shard, leadership);
            }
            let before = leaders.len();
            leaders.retain(|_, l| !l.lost.is_cancelled());
            if leaders.len() < before {
                // One line for the shards lost together (an etcd outage
                // takes them all), not one per election.
                tracing::warn!(
                    lost = before - leaders.len(),
                    held = leaders.len(),
                    "health check shards lost"
                );
            }
            let members = match self.membership(&member_key, &mut membership).await {
                Ok(members) => {
                    if !reachable {
                        tracing::info!("health check shards: the store answers again");
                        reachable = true;
                    }
                    members
                }
                Err(err) => {
                    // Keep what is held: an election whose lease cannot be
                    // renewed is lost on its own, and then dropped above.
                    if reachable {
                        tracing::warn!(%err, "health check shards: cannot reach the store");
                        reachable = false;
                    }
                    publish(&held, &leaders);
                    continue;
                }
            };
            let want = if members.contains(&self.candidate) {
                preferred(&members, &self.candidate)
            } else {
                BTreeSet::new()
            };
            // Dropping a leadership resigns it, so the preferred member's
            // campaign wins at once.
            leaders.retain(|shard, _| want.contains(shard));
            campaigns.retain(|shard, task| {
                let keep = want.contains(shard) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            for &shard in &want {
                if leaders.contains_key(&shard) || campaigns.contains_key(&shard) {
                    continue;
                }
                let (store, won) = (self.store.clone(), won_tx.clone());
                let election = self.keys.election(&format!("health-checker/{shard}"));
                let candidate = self.candidate.clone();
                campaigns.insert(
                    shard,
                    tokio::spawn(async move {
                        match store.campaign(&election, &candidate, SHARD_TTL).await {
                            Ok(leadership) => {
                                let _ = won.send((shard, leadership));
                            }
                            Err(err) => tracing::debug!(shard, %err, "shard campaign failed"),
                        }
                    }),
                );
            }
            publish(&held, &leaders);
        }
        for task in campaigns.into_values() {
            task.abort();
        }
        drop(leaders);
        held.send_replace(BTreeSet::new());
        if let Some(lease) = membership {
            let _ = self.store.revoke_lease(lease).await;
        }
    }

    /// Renews (or makes) this replica's membership and reads the members.
    async fn membership(
        &self,
        member_key: &str,
        membership: &mut Option<LeaseId>,
    ) -> Result<Vec<String>, StoreError> {
        if let Some(lease) = *membership {
            match self.store.keep_alive(lease).await {
                Ok(_) => {}
                Err(StoreError::LeaseNotFound(_)) => *membership = None,
                Err(err) => return Err(err),
            }
        }
        if membership.is_none() {
            let lease = self.store.grant_lease(SHARD_TTL).await?;
            self.store.put(member_key, Vec::new(), Some(lease)).await?;
            *membership = Some(lease);
        }
        let prefix = self.keys.checkers();
        let range = self.store.range(&prefix).await?;
        Ok(range
            .kvs
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }
}

fn publish(held: &watch::Sender<BTreeSet<u16>>, leaders: &HashMap<u16, Leadership>) {
    let now: BTreeSet<u16> = leaders
        .iter()
        .filter(|(_, l)| !l.lost.is_cancelled())
        .map(|(s, _)| *s)
        .collect();
    held.send_if_modified(|current| {
        let changed = *current != now;
        if changed {
            *current = now;
        }
        changed
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_has_exactly_one_preferred_member() {
        let members: Vec<String> = (0..3).map(|i| format!("cp{i}:8500")).collect();
        let shares: Vec<BTreeSet<u16>> = members.iter().map(|m| preferred(&members, m)).collect();
        let total: usize = shares.iter().map(BTreeSet::len).sum();
        assert_eq!(total, usize::from(SHARDS));
        for share in &shares {
            // Even enough: none is empty or holds nearly all.
            assert!(share.len() >= 4 && share.len() <= 20, "{shares:?}");
        }
        // A member leaving moves only its own shards.
        let rest = members[..2].to_vec();
        for (i, m) in rest.iter().enumerate() {
            assert!(shares[i].is_subset(&preferred(&rest, m)));
        }
    }

    #[test]
    fn shards_spread_instances() {
        let mut count = [0usize; SHARDS as usize];
        for i in 0..3200 {
            count[usize::from(shard_of("user", &format!("u{i}")))] += 1;
        }
        assert!(count.iter().all(|&c| c > 50 && c < 150), "{count:?}");
    }
}
