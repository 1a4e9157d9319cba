//! Access tokens.
//!
//! Two kinds: the admin token (read from `--admin-token-file`, kept in memory
//! as a hash) and service tokens (made by the admin, each scoped to one
//! service). Service tokens are stored only as their SHA-256 hash, so a copy of
//! etcd does not hand out working tokens; each has a separate, non-secret
//! accessor id to list and revoke it by. [`TokenCache`] keeps the stored
//! tokens in memory from a watch.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::StreamExt;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::model::TokenRecord;
use crate::store::{KeyKind, KeyValue, Keys, Store, StoreError, WatchEvent};

/// Prefix of every token Signpost makes, so a leaked one is easy to grep for.
pub const TOKEN_PREFIX: &str = "sp_";

/// Makes a new random token: `sp_` and 32 random bytes in hex.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// The hash a token is stored and compared under (hex SHA-256).
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// Compares two hashes without stopping at the first difference, so response
/// times do not reveal how much of a guessed token was right.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Makes a new accessor: 16 random bytes in hex. It names a token in lists
/// and revocations and grants nothing.
pub fn generate_accessor() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A known service token, as the cache holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownToken {
    /// The hash the token is stored under.
    pub hash: String,
    /// Its record (with the accessor filled in for old records).
    pub record: TokenRecord,
}

/// The service tokens in the store, kept current by a watch: checking a
/// token reads memory, never the store, so a guessed token costs the store
/// nothing, and a revocation on any control plane reaches every other one
/// as fast as the watch (milliseconds).
#[derive(Debug, Default)]
pub struct TokenCache {
    by_hash: ArcSwap<HashMap<String, TokenRecord>>,
    synced: AtomicBool,
    notify: tokio::sync::Notify,
}

/// How long the watch waits before retrying after losing the store,
/// doubling up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

impl TokenCache {
    /// An empty cache; [`TokenCache::run`] fills it.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Whether the tokens have been read from the store at least once.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// The record of the token with this hash, if it is known.
    pub fn get(&self, hash: &str) -> Option<TokenRecord> {
        self.by_hash.load().get(hash).cloned()
    }

    /// Every known token, oldest first.
    pub fn list(&self) -> Vec<KnownToken> {
        let mut all: Vec<KnownToken> = self
            .by_hash
            .load()
            .iter()
            .map(|(hash, record)| KnownToken {
                hash: hash.clone(),
                record: record.clone(),
            })
            .collect();
        all.sort_by(|a, b| {
            (a.record.created, &a.record.accessor).cmp(&(b.record.created, &b.record.accessor))
        });
        all
    }

    /// The token with this accessor, if it is known.
    pub fn by_accessor(&self, accessor: &str) -> Option<KnownToken> {
        self.by_hash
            .load()
            .iter()
            .find(|(_, r)| r.accessor == accessor)
            .map(|(hash, record)| KnownToken {
                hash: hash.clone(),
                record: record.clone(),
            })
    }

    /// Waits until `done` holds for the cache, or `timeout` passes.
    /// Returns whether it held.
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let wait = async {
            loop {
                let changed = self.notify.notified();
                if done(self) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    fn publish(&self, map: HashMap<String, TokenRecord>) {
        self.by_hash.store(Arc::new(map));
        self.notify.notify_waiters();
    }

    /// Keeps the cache current from `store` until `cancel` fires: a read of
    /// the tokens, then a watch from the next revision; on any loss, again
    /// (meanwhile the last known tokens stay in use).
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        keys: Keys,
        cancel: CancellationToken,
    ) {
        let mut backoff = FIRST_RETRY;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.sync_once(&*store, &keys, &mut backoff) => r,
            };
            match result {
                Err(err) => tracing::debug!(%err, retry_in = ?backoff, "token watch lost"),
                Ok(()) => tracing::debug!(retry_in = ?backoff, "token watch ended"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_RETRY);
        }
    }

    async fn sync_once(
        &self,
        store: &dyn Store,
        keys: &Keys,
        backoff: &mut Duration,
    ) -> Result<(), StoreError> {
        let prefix = keys.token("");
        let read = store.range(&prefix).await?;
        let mut map = HashMap::new();
        for kv in &read.kvs {
            put(&mut map, keys, kv);
        }
        let mut stream = store.watch(&prefix, read.revision + 1).await?;
        self.publish(map.clone());
        self.synced.store(true, Ordering::Relaxed);
        *backoff = FIRST_RETRY;
        while let Some(batch) = stream.next().await {
            for event in batch?.events {
                match event {
                    WatchEvent::Put(kv) => put(&mut map, keys, &kv),
                    WatchEvent::Delete { key, .. } => {
                        if let KeyKind::Token(hash) = keys.parse(&key) {
                            map.remove(&hash);
                        }
                    }
                }
            }
            self.publish(map.clone());
        }
        Ok(())
    }
}

fn put(map: &mut HashMap<String, TokenRecord>, keys: &Keys, kv: &KeyValue) {
    let KeyKind::Token(hash) = keys.parse(&kv.key) else {
        return;
    };
    match serde_json::from_slice::<TokenRecord>(&kv.value) {
        Ok(mut record) => {
            if record.accessor.is_empty() {
                // Records made before accessors: named by the start of the
                // hash, which reveals nothing of the token.
                record.accessor = hash.chars().take(16).collect();
            }
            map.insert(hash, record);
        }
        Err(err) => tracing::warn!(key = %kv.key, %err, "ignoring unreadable token record"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 64);
        assert_eq!(hash(&a), hash(&format!("{a}\n")));
        assert!(hashes_equal(&hash(&a), &hash(&a)));
        assert!(!hashes_equal(&hash(&a), &hash(&b)));
    }
}
