//! The one conformance suite every [`Store`] implementation passes, so code
//! above the store can rely on the same behaviour from etcd and from memory.
//!
//! Each check takes a store and a key prefix of its own, so checks can share
//! one etcd without seeing each other's keys. Every wait is bounded: a
//! broken implementation fails a check, it never hangs it. Checks run in
//! real time with short leases (1–2 s), because etcd's clock cannot be
//! paused.
//!
//! Compaction is store-wide, so [`watch_from_compacted_revision`] must not
//! run concurrently with checks that watch from the past on the same store;
//! [`run_all`] runs the checks one after another.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{KeyValue, Revision, Store, StoreError, WatchEvent, WatchStream};

/// The longest any single store call may take in these checks. Stores
/// promise to answer within a few seconds; this only catches hangs.
const CALL_LIMIT: Duration = Duration::from_secs(10);

/// How long a 1 s lease may take to vanish: etcd rounds short TTLs up to its
/// minimum and checks expiry every 500 ms, so allow generous slack.
const EXPIRY_LIMIT: Duration = Duration::from_secs(6);

/// Awaits `fut`, failing the check (not hanging it) after [`CALL_LIMIT`].
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(CALL_LIMIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {CALL_LIMIT:?}"),
    }
}

/// Awaits a store call that must succeed.
async fn ok<T>(what: &str, fut: impl Future<Output = Result<T, StoreError>>) -> T {
    match bounded(what, fut).await {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Reads `stream` until `done` holds for everything read so far, or `limit`
/// passes (then the check fails, listing what it got).
async fn collect_until(
    stream: &mut WatchStream,
    limit: Duration,
    done: impl Fn(&[WatchEvent]) -> bool,
) -> Vec<WatchEvent> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while !done(&seen) {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(batch))) => {
                assert!(!batch.events.is_empty(), "a watch batch must not be empty");
                seen.extend(batch.events);
            }
            Ok(Some(Err(e))) => panic!("watch failed: {e}; events so far: {seen:?}"),
            Ok(None) => panic!("watch ended; events so far: {seen:?}"),
            Err(_) => panic!("watch: condition not met within {limit:?}; events: {seen:?}"),
        }
    }
    seen
}

fn event_key(e: &WatchEvent) -> &str {
    match e {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

fn event_revision(e: &WatchEvent) -> i64 {
    match e {
        WatchEvent::Put(kv) => kv.mod_revision,
        WatchEvent::Delete { mod_revision, .. } => *mod_revision,
    }
}

fn is_delete_of(e: &WatchEvent, key: &str) -> bool {
    matches!(e, WatchEvent::Delete { key: k, .. } if k == key)
}

/// Put, get, range and delete; revisions increase with every write.
pub async fn put_get_range_delete(store: &dyn Store, prefix: &str) {
    let dir = format!("{prefix}kv/");
    let (a, b, c) = (format!("{dir}a"), format!("{dir}b"), format!("{dir}c"));
    // Written out of key order, to check that range sorts.
    let rc = ok("put c", store.put(&c, b"3".to_vec(), None)).await;
    let ra = ok("put a", store.put(&a, b"1".to_vec(), None)).await;
    let rb = ok("put b", store.put(&b, b"2".to_vec(), None)).await;
    assert!(
        rc < ra && ra < rb,
        "revisions must increase: {rc} {ra} {rb}"
    );
    ok(
        "put outside",
        store.put(&format!("{prefix}kv-other"), vec![], None),
    )
    .await;

    let got = ok("get a", store.get(&a)).await.expect("a exists");
    assert_eq!(got.key, a);
    assert_eq!(got.value, b"1");
    assert_eq!(got.mod_revision, ra);
    assert_eq!(got.lease, None);
    assert_eq!(
        ok("get missing", store.get(&format!("{dir}zz"))).await,
        None
    );

    let range = ok("range", store.range(&dir)).await;
    let keys: Vec<&str> = range.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, [a.as_str(), b.as_str(), c.as_str()]);
    assert!(
        range.revision >= rb,
        "range revision {} < {rb}",
        range.revision
    );

    assert_eq!(
        ok("delete a", store.delete(std::slice::from_ref(&a))).await,
        1
    );
    assert_eq!(ok("get a", store.get(&a)).await, None);
    assert_eq!(ok("delete a again", store.delete(&[a])).await, 0);
    assert_eq!(ok("range", store.range(&dir)).await.kvs.len(), 2);
    let rd = ok("put after delete", store.put(&b, b"22".to_vec(), None)).await;
    assert!(rd > rb);
}

/// A paged read of a prefix hands over every key under it once, in key
/// order, in non-empty pages, and nothing outside it (a key that shares the
/// prefix's text but not its last byte, or sorts just past it).
pub async fn range_pages_cover_the_prefix(store: &dyn Store, prefix: &str) {
    let dir = format!("{prefix}pages/");
    let mut written = Vec::new();
    // Out of key order, and across several pages of a small page size.
    for i in (0..10).rev() {
        let key = format!("{dir}k{i:02}");
        let rev = ok("put", store.put(&key, vec![b'x'; i], None)).await;
        written.push((key, rev));
    }
    written.sort();
    for outside in [format!("{prefix}pages0"), format!("{prefix}pages")] {
        ok("put outside", store.put(&outside, vec![], None)).await;
    }
    let mut pages: Vec<Vec<KeyValue>> = Vec::new();
    let revision = ok(
        "range_pages",
        store.range_pages(&dir, &mut |page| pages.push(page)),
    )
    .await;
    assert!(pages.iter().all(|p| !p.is_empty()), "an empty page");
    let got: Vec<(String, Revision)> = pages
        .into_iter()
        .flatten()
        .map(|kv| (kv.key, kv.mod_revision))
        .collect();
    assert_eq!(got, written);
    let last = written.iter().map(|(_, r)| *r).max().unwrap_or_default();
    assert!(
        revision > last,
        "read at {revision}, before the last write {last}"
    );
    let mut none = 0;
    let empty = ok(
        "range_pages of nothing",
        store.range_pages(&format!("{prefix}absent/"), &mut |page| none += page.len()),
    )
    .await;
    assert_eq!(none, 0);
    assert!(empty >= revision);
}

/// The create revision stays across updates and restarts after a delete;
/// the mod revision follows every write.
pub async fn create_and_mod_revisions(store: &dyn Store, prefix: &str) {
    let k = format!("{prefix}rev/k");
    let r1 = ok("put", store.put(&k, b"1".to_vec(), None)).await;
    let r2 = ok("put", store.put(&k, b"2".to_vec(), None)).await;
    assert!(r2 > r1);
    let kv = ok("get", store.get(&k)).await.expect("k exists");
    assert_eq!((kv.create_revision, kv.mod_revision), (r1, r2));
    assert_eq!(kv.value, b"2");

    ok("delete", store.delete(std::slice::from_ref(&k))).await;
    let r3 = ok("put", store.put(&k, b"3".to_vec(), None)).await;
    let kv = ok("get", store.get(&k)).await.expect("k exists");
    assert_eq!((kv.create_revision, kv.mod_revision), (r3, r3));
}

/// `put_if_present` writes only while its guard exists.
pub async fn put_if_present_follows_guard(store: &dyn Store, prefix: &str) {
    let guard = format!("{prefix}pip/instance");
    let key = format!("{prefix}pip/health");
    let wrote = ok(
        "pip",
        store.put_if_present(&key, b"x".to_vec(), None, &guard),
    )
    .await;
    assert!(!wrote, "wrote without the guard");
    assert_eq!(ok("get", store.get(&key)).await, None);

    ok("put guard", store.put(&guard, b"g".to_vec(), None)).await;
    let wrote = ok(
        "pip",
        store.put_if_present(&key, b"y".to_vec(), None, &guard),
    )
    .await;
    assert!(wrote, "did not write with the guard present");
    assert_eq!(
        ok("get", store.get(&key)).await.expect("written").value,
        b"y"
    );

    // Under a lease, too, and a dead lease is refused even with the guard.
    let lease = ok("grant", store.grant_lease(Duration::from_secs(30))).await;
    assert!(
        ok(
            "pip",
            store.put_if_present(&key, b"z".to_vec(), Some(lease), &guard)
        )
        .await
    );
    assert_eq!(
        ok("get", store.get(&key)).await.expect("written").lease,
        Some(lease)
    );
    ok("revoke", store.revoke_lease(lease)).await;
    assert_eq!(
        ok("get", store.get(&key)).await,
        None,
        "revoke left the key"
    );
    assert_eq!(
        bounded(
            "pip dead lease",
            store.put_if_present(&key, vec![], Some(lease), &guard)
        )
        .await,
        Err(StoreError::LeaseNotFound(lease))
    );
}

/// A multi-key delete counts the keys that existed and is one atomic write:
/// its deletes share one revision.
pub async fn multi_delete_is_atomic(store: &dyn Store, prefix: &str) {
    let dir = format!("{prefix}md/");
    let keys: Vec<String> = (0..3).map(|i| format!("{dir}{i}")).collect();
    let mut last = 0;
    for k in &keys {
        last = ok("put", store.put(k, vec![], None)).await;
    }
    let mut watch = ok("watch", store.watch(&dir, last + 1)).await;
    let doomed = vec![keys[0].clone(), keys[1].clone(), format!("{dir}missing")];
    assert_eq!(ok("delete", store.delete(&doomed)).await, 2);
    assert_eq!(ok("delete none", store.delete(&[])).await, 0);

    let events = collect_until(&mut watch, Duration::from_secs(5), |e| e.len() >= 2).await;
    assert!(is_delete_of(&events[0], &keys[0]) && is_delete_of(&events[1], &keys[1]));
    assert_eq!(event_revision(&events[0]), event_revision(&events[1]));
    let left = ok("range", store.range(&dir)).await;
    assert_eq!(left.kvs.len(), 1);
    assert_eq!(left.kvs[0].key, keys[2]);
}

/// A key under a 1 s lease vanishes on its own, and watchers see a Delete.
pub async fn lease_expiry_deletes_key(store: &dyn Store, prefix: &str) {
    let key = format!("{prefix}lease-expiry/k");
    let lease = ok("grant", store.grant_lease(Duration::from_secs(1))).await;
    let rev = ok("put", store.put(&key, b"v".to_vec(), Some(lease))).await;
    assert_eq!(
        ok("get", store.get(&key)).await.expect("put").lease,
        Some(lease)
    );
    let mut watch = ok("watch", store.watch(&key, rev + 1)).await;

    // Only the watch is read: expiry must happen with no other activity.
    let events = collect_until(&mut watch, EXPIRY_LIMIT, |e| !e.is_empty()).await;
    assert!(is_delete_of(&events[0], &key), "{events:?}");
    assert_eq!(ok("get", store.get(&key)).await, None);
    assert_eq!(
        bounded("keep_alive after expiry", store.keep_alive(lease)).await,
        Err(StoreError::LeaseNotFound(lease))
    );
    assert_eq!(
        bounded(
            "put under expired lease",
            store.put(&key, vec![], Some(lease))
        )
        .await,
        Err(StoreError::LeaseNotFound(lease))
    );
}

/// Keep-alives every 300 ms hold a 1 s lease well past its TTL.
pub async fn keep_alive_holds_lease(store: &dyn Store, prefix: &str) {
    let key = format!("{prefix}keep-alive/k");
    let lease = ok("grant", store.grant_lease(Duration::from_secs(1))).await;
    ok("put", store.put(&key, b"v".to_vec(), Some(lease))).await;
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ttl = ok("keep_alive", store.keep_alive(lease)).await;
        assert!(ttl >= Duration::from_secs(1), "renewed to {ttl:?}");
    }
    assert!(
        ok("get", store.get(&key)).await.is_some(),
        "kept-alive key expired"
    );
    ok("revoke", store.revoke_lease(lease)).await;
}

/// Revoking deletes the lease's keys at once (one revision); the lease is
/// then gone for keep-alives and puts, and revoking again is fine.
pub async fn revoke_deletes_keys(store: &dyn Store, prefix: &str) {
    let dir = format!("{prefix}revoke/");
    let (a, b) = (format!("{dir}a"), format!("{dir}b"));
    let lease = ok("grant", store.grant_lease(Duration::from_secs(30))).await;
    ok("put", store.put(&a, vec![], Some(lease))).await;
    let rev = ok("put", store.put(&b, vec![], Some(lease))).await;
    let mut watch = ok("watch", store.watch(&dir, rev + 1)).await;
    ok("revoke", store.revoke_lease(lease)).await;

    let events = collect_until(&mut watch, Duration::from_secs(5), |e| e.len() >= 2).await;
    let mut keys: Vec<&str> = events.iter().map(event_key).collect();
    keys.sort_unstable();
    assert_eq!(keys, [a.as_str(), b.as_str()]);
    assert!(
        events
            .iter()
            .all(|e| matches!(e, WatchEvent::Delete { .. }))
    );
    assert_eq!(event_revision(&events[0]), event_revision(&events[1]));
    assert!(ok("range", store.range(&dir)).await.kvs.is_empty());

    assert_eq!(
        bounded("keep_alive revoked", store.keep_alive(lease)).await,
        Err(StoreError::LeaseNotFound(lease))
    );
    assert_eq!(
        bounded("put revoked", store.put(&a, vec![], Some(lease))).await,
        Err(StoreError::LeaseNotFound(lease))
    );
    ok("revoke again", store.revoke_lease(lease)).await;
}

/// A watch from a past revision replays what happened since, in order.
pub async fn watch_replays_history(store: &dyn Store, prefix: &str) {
    let dir = format!("{prefix}replay/");
    let (a, b) = (format!("{dir}a"), format!("{dir}b"));
    let r1 = ok("put a", store.put(&a, b"1".to_vec(), None)).await;
    let r2 = ok("put b", store.put(&b, b"2".to_vec(), None)).await;
    let deleted = ok("delete a", store.delete(std::slice::from_ref(&a))).await;
    assert_eq!(deleted, 1);
    ok(
        "put outside",
        store.put(&format!("{prefix}replay-not"), vec![], None),
    )
    .await;

    let mut watch = ok("watch", store.watch(&dir, r1)).await;
    let events = collect_until(&mut watch, Duration::from_secs(5), |e| e.len() >= 3).await;
    assert_eq!(events.len(), 3, "{events:?}");
    match &events[0] {
        WatchEvent::Put(kv) => assert_eq!((kv.key.as_str(), kv.mod_revision), (a.as_str(), r1)),
        e => panic!("expected put of a, got {e:?}"),
    }
    match &events[1] {
        WatchEvent::Put(kv) => {
            assert_eq!((kv.key.as_str(), &kv.value[..]), (b.as_str(), &b"2"[..]))
        }
        e => panic!("expected put of b, got {e:?}"),
    }
    assert_eq!(event_revision(&events[1]), r2);
    assert!(is_delete_of(&events[2], &a), "{events:?}");
    assert!(event_revision(&events[2]) > r2);

    // A watch starting in the middle sees only the rest.
    let mut watch = ok("watch", store.watch(&dir, r2 + 1)).await;
    let events = collect_until(&mut watch, Duration::from_secs(5), |e| !e.is_empty()).await;
    assert!(is_delete_of(&events[0], &a), "{events:?}");
}

/// A live watch sees puts and deletes under its prefix, and nothing else.
pub async fn watch_sees_changes(store: &dyn Store, prefix: &str) {
    let dir = format!("{prefix}live/");
    let k = format!("{dir}k");
    let now = ok("ping", store.ping()).await;
    let mut watch = ok("watch", store.watch(&dir, now + 1)).await;
    ok(
        "put outside",
        store.put(&format!("{prefix}live-not"), vec![], None),
    )
    .await;
    let r1 = ok("put", store.put(&k, b"1".to_vec(), None)).await;
    let r2 = ok("put", store.put(&k, b"2".to_vec(), None)).await;
    ok("delete", store.delete(std::slice::from_ref(&k))).await;

    let events = collect_until(&mut watch, Duration::from_secs(5), |e| e.len() >= 3).await;
    assert_eq!(events.len(), 3, "{events:?}");
    match (&events[0], &events[1]) {
        (WatchEvent::Put(first), WatchEvent::Put(second)) => {
            assert_eq!((first.mod_revision, &first.value[..]), (r1, &b"1"[..]));
            assert_eq!((second.mod_revision, &second.value[..]), (r2, &b"2"[..]));
            assert_eq!(second.create_revision, r1);
        }
        other => panic!("expected two puts, got {other:?}"),
    }
    assert!(is_delete_of(&events[2], &k));
}

/// A watch from a compacted revision fails with `Compacted`, either at once
/// or as the stream's first item. Compacts the whole store.
pub async fn watch_from_compacted_revision(store: &dyn Store, prefix: &str) {
    let k = format!("{prefix}compact/k");
    let r1 = ok("put", store.put(&k, b"1".to_vec(), None)).await;
    ok("put", store.put(&k, b"2".to_vec(), None)).await;
    let r3 = ok("put", store.put(&k, b"3".to_vec(), None)).await;
    ok("compact", store.compact(r3)).await;

    let err = match bounded("watch", store.watch(&k, r1)).await {
        Err(e) => e,
        Ok(mut stream) => match bounded("first watch item", stream.next()).await {
            Some(Err(e)) => e,
            other => panic!("expected Compacted, got {other:?}"),
        },
    };
    match err {
        StoreError::Compacted {
            requested,
            compact_revision,
        } => {
            assert_eq!(requested, r1);
            assert!(
                compact_revision >= r3,
                "compact revision {compact_revision} < {r3}"
            );
        }
        e => panic!("expected Compacted, got {e}"),
    }

    // The compacted revision itself is still watchable.
    let mut watch = ok("watch at compaction", store.watch(&k, r3)).await;
    let r4 = ok("put", store.put(&k, b"4".to_vec(), None)).await;
    let events = collect_until(&mut watch, Duration::from_secs(5), |e| {
        e.iter().any(|e| event_revision(e) == r4)
    })
    .await;
    assert!(events.iter().all(|e| event_revision(e) >= r3));
}

/// One leader at a time: a second campaign waits until the first resigns.
pub async fn election_one_leader_at_a_time(store: &dyn Store, prefix: &str) {
    let name = format!("{prefix}election/checker");
    let ttl = Duration::from_secs(2);
    let first = ok("first campaign", store.campaign(&name, "a", ttl)).await;
    assert!(!first.lost.is_cancelled());

    let mut second = store.campaign(&name, "b", ttl);
    // Longer than a TTL: the first leader's keep-alive must hold it.
    let early = tokio::time::timeout(Duration::from_millis(2500), &mut second).await;
    assert!(
        early.is_err(),
        "second candidate elected while the first leads"
    );
    assert!(!first.lost.is_cancelled(), "first leader lost its lease");

    drop(first);
    let second = match tokio::time::timeout(Duration::from_secs(5), second).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => panic!("second campaign failed: {e}"),
        Err(_) => panic!("second candidate not elected within 5 s of the first resigning"),
    };
    assert!(!second.lost.is_cancelled());
    drop(second);

    // And the election is free again afterwards.
    let third = ok("third campaign", store.campaign(&name, "c", ttl)).await;
    drop(third);
}

/// `ping` answers with the current revision.
pub async fn ping_returns_revision(store: &dyn Store, prefix: &str) {
    let rev = ok("put", store.put(&format!("{prefix}ping/k"), vec![], None)).await;
    let now = ok("ping", store.ping()).await;
    assert!(now >= rev, "ping revision {now} < last write {rev}");
}

/// Runs every check, one after another, each under its own sub-prefix of
/// `prefix` (which should be unique to the run, e.g. a test name).
pub async fn run_all(store: Arc<dyn Store>, prefix: &str) {
    let store = store.as_ref();
    let p = |name: &str| format!("{prefix}{name}/");
    put_get_range_delete(store, &p("put_get_range_delete")).await;
    range_pages_cover_the_prefix(store, &p("range_pages_cover_the_prefix")).await;
    create_and_mod_revisions(store, &p("create_and_mod_revisions")).await;
    put_if_present_follows_guard(store, &p("put_if_present_follows_guard")).await;
    multi_delete_is_atomic(store, &p("multi_delete_is_atomic")).await;
    lease_expiry_deletes_key(store, &p("lease_expiry_deletes_key")).await;
    keep_alive_holds_lease(store, &p("keep_alive_holds_lease")).await;
    revoke_deletes_keys(store, &p("revoke_deletes_keys")).await;
    watch_replays_history(store, &p("watch_replays_history")).await;
    watch_sees_changes(store, &p("watch_sees_changes")).await;
    election_one_leader_at_a_time(store, &p("election_one_leader_at_a_time")).await;
    ping_returns_revision(store, &p("ping_returns_revision")).await;
    // Last: it compacts the whole store.
    watch_from_compacted_revision(store, &p("watch_from_compacted_revision")).await;
}

/// Declares one `#[tokio::test]` per check, each on a fresh store from
/// `$make` (an expression evaluated inside the test's runtime). For stores
/// that are cheap to create, like [`super::MemoryStore`].
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store_conformance_tests!(@each $make;
            put_get_range_delete,
            range_pages_cover_the_prefix,
            create_and_mod_revisions,
            put_if_present_follows_guard,
            multi_delete_is_atomic,
            lease_expiry_deletes_key,
            keep_alive_holds_lease,
            revoke_deletes_keys,
            watch_replays_history,
            watch_sees_changes,
            watch_from_compacted_revision,
            election_one_leader_at_a_time,
            ping_returns_revision,
        );
    };
    (@each $make:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let store = $make;
                $crate::store::conformance::$check(&store, concat!("/conformance/", stringify!($check), "/")).await;
            }
        )*
    };
}
