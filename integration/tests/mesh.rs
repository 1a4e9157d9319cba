//! The request path through sidecars, end to end: a real etcd, a real
//! `signpost server` with its CA and DNS, and `user`/`order` example apps each
//! with a `signpost sidecar`, all on their own loopback addresses
//! (127.0.<net>.x, one <net> per test so tests run side by side).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use signpost_integration::eventually;
use signpost_integration::mesh::Mesh;

/// Sends GET /users/N through `client` in a loop until `stop`, counting
/// successes and failures (bounded: at most `max` requests).
fn steady_stream(
    client: reqwest::Client,
    stop: Arc<AtomicBool>,
    max: usize,
) -> (
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<Vec<String>>,
) {
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (ok2, failed2) = (ok.clone(), failed.clone());
    let task = tokio::spawn(async move {
        let mut errors = Vec::new();
        for i in 0..max {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            match client
                .get(format!("http://user/users/{}", i % 10))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    ok2.fetch_add(1, Ordering::Relaxed);
                }
                Ok(r) => {
                    failed2.fetch_add(1, Ordering::Relaxed);
                    let e = r
                        .headers()
                        .get("x-signpost-error")
                        .map(|v| v.to_str().unwrap_or("").to_string());
                    errors.push(format!("{} {:?}", r.status(), e));
                }
                Err(e) => {
                    failed2.fetch_add(1, Ordering::Relaxed);
                    errors.push(e.to_string());
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        errors
    });
    (ok, failed, task)
}

/// Waits until a request from order's app reaches user through the mesh.
async fn order_reaches_user(client: &reqwest::Client) {
    eventually("order reaches user", Duration::from_secs(20), || {
        let client = client.clone();
        async move {
            client
                .get("http://user/users/1")
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_sidecars_reach_both_user_instances_over_mtls() {
    let mesh = Mesh::start(61, "1h").await;
    let u1 = mesh.pod("user", "u1", 11).await;
    let _u2 = mesh.pod("user", "u2", 12).await;
    let order = mesh.pod("order", "o1", 21).await;
    let client = mesh.via(&order);

    let mut served = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while served.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {served:?} answered"
        );
        if let Ok(r) = client.get("http://user/users/1").send().await
            && let Ok(v) = r.json::<Value>().await
            && let Some(s) = v["served_by"].as_str()
        {
            served.insert(s.to_string());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served.into_iter().collect::<Vec<_>>(), ["u1", "u2"]);

    // The order app calls user through its own sidecar.
    let body: Value = mesh
        .http
        .get(format!("http://{}:8080/orders/3", mesh.ip(21)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["user"]["id"], 4, "{body}");

    // The user sidecar saw mTLS requests from order.
    let m = mesh.metrics(&u1).await + &mesh.metrics(&_u2).await;
    assert!(
        m.contains("signpost_sidecar_requests_total{direction=\"inbound\""),
        "{m}"
    );
    let m = mesh.metrics(&order).await;
    assert!(
        m.contains("signpost_sidecar_requests_total{direction=\"outbound\",service=\"user\",status=\"200\"}"),
        "{m}"
    );

    // Unknown service: 503 from the mesh, marked as such.
    let resp = client.get("http://nosuch/x").send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("x-signpost-error"));

    // The TCP upstream carries bytes both ways (an HTTP exchange over it).
    let resp = reqwest::get(format!("http://{}:15432/users/5", mesh.ip(21)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["id"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mtls_refuses_plaintext_and_allow_list_refuses_callers() {
    let mesh = Mesh::start(62, "1h").await;
    let _u1 = mesh.pod("user", "u1", 11).await;
    let order = mesh.pod("order", "o1", 21).await;
    let client = mesh.via(&order);
    order_reaches_user(&client).await;

    // Permissive (default): plain HTTP to the inbound port works.
    let plain = format!("http://{}:15006/users/1", mesh.ip(11));
    assert_eq!(mesh.http.get(&plain).send().await.unwrap().status(), 200);

    mesh.put_config("user", json!({"mtls": "strict"})).await;
    eventually(
        "strict refuses plaintext",
        Duration::from_secs(10),
        || async {
            match mesh.http.get(&plain).send().await {
                Ok(r) => r.status() != 200,
                Err(_) => true,
            }
        },
    )
    .await;
    // (Certificate-less TLS being refused in the handshake is covered by
    // sidecar/tests/mtls.rs, which drives rustls directly.)
    // mTLS from order still works.
    assert_eq!(
        client
            .get("http://user/users/1")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // An allow-list without order: 403 with a readable reason.
    mesh.put_config("user", json!({"mtls": "strict", "allow": ["billing"]}))
        .await;
    eventually("allow-list refuses order", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            match client.get("http://user/users/1").send().await {
                Ok(r) if r.status() == 403 => {
                    let text = r.text().await.unwrap_or_default();
                    text.contains("order")
                }
                _ => false,
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_user_app_costs_a_handful_and_ejects_it() {
    let mesh = Mesh::start(63, "1h").await;
    let mut u1 = mesh.pod("user", "u1", 11).await;
    let _u2 = mesh.pod("user", "u2", 12).await;
    let order = mesh.pod("order", "o1", 21).await;
    let client = mesh.via(&order);
    eventually(
        "order's sidecar balances over two endpoints",
        Duration::from_secs(20),
        || {
            let client = client.clone();
            let mesh = &mesh;
            let order = &order;
            async move {
                let _ = client.get("http://user/users/1").send().await;
                mesh.metrics(order)
                    .await
                    .contains("signpost_sidecar_endpoints{service=\"user\"} 2")
            }
        },
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, task) = steady_stream(client, stop.clone(), 2000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    u1.app.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let errors = task.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 50, "only {ok} requests succeeded");
    assert!(failed <= 6, "{failed} requests failed: {errors:?}");
    // The dead endpoint leaves rotation: ejected by order's sidecar after
    // failures, or, when peak-EWMA had already steered every request to u2
    // (so nothing failed that could eject it), dropped from DNS once u1's
    // sidecar reports its app critical.
    eventually("u1 out of rotation", Duration::from_secs(15), || async {
        let m = mesh.metrics(&order).await;
        m.lines()
            .any(|l| l.starts_with("signpost_sidecar_ejections_total") && !l.ends_with(" 0"))
            || m.contains("signpost_sidecar_endpoints{service=\"user\"} 1")
    })
    .await;
    drop(u1.sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_rolling_restart_fail_no_request() {
    let mesh = Mesh::start(64, "1h").await;
    let mut u1 = mesh.pod("user", "u1", 11).await;
    let mut u2 = mesh.pod("user", "u2", 12).await;
    let order = mesh.pod("order", "o1", 21).await;
    let client = mesh.via(&order);
    order_reaches_user(&client).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, task) = steady_stream(client, stop.clone(), 5000);

    // Roll u1: SIGTERM its sidecar (it deregisters, lingers, drains), stop
    // the app, start a new instance; then the same for u2.
    let mut replacements = Vec::new();
    for (old, id, host) in [(&mut u1, "u3", 13u8), (&mut u2, "u4", 14u8)] {
        // The new instance first, as a rolling update does.
        replacements.push(mesh.pod("user", id, host).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(old.sidecar.terminate(Duration::from_secs(20)), Some(0));
        old.app.terminate(Duration::from_secs(10));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let errors = task.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "only {ok} requests succeeded");
    assert_eq!(
        failed, 0,
        "requests failed during the rolling restart: {errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_fails_no_request() {
    let mesh = Mesh::start(65, "12s").await;
    let u1 = mesh.pod("user", "u1", 11).await;
    let order = mesh.pod("order", "o1", 21).await;
    let client = mesh.via(&order);
    order_reaches_user(&client).await;
    let expiry = |m: String| {
        m.lines()
            .find(|l| l.starts_with("signpost_sidecar_certificate_expiry_seconds"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let first = expiry(mesh.metrics(&u1).await);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, task) = steady_stream(client, stop.clone(), 5000);
    eventually(
        "the user sidecar renewed its certificate",
        Duration::from_secs(20),
        || async { expiry(mesh.metrics(&u1).await) > first },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let errors = task.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "only {ok} requests succeeded");
    assert_eq!(failed, 0, "requests failed across the rotation: {errors:?}");
}
