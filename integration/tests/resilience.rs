//! The mesh recovering on its own: a CA rotation that drops the root the
//! sidecars' certificates came from, and a destination whose DNS goes away.
//! Real etcd, control plane, sidecars and example apps on 127.0.78.x.

use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use signpost_integration::mesh::Mesh;
use signpost_integration::{eventually, signpost_bin};

/// Deletes every key under `prefix` through etcd's JSON gateway.
async fn etcd_delete_prefix(endpoint: &str, prefix: &str) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let rsp = reqwest::Client::new()
        .post(format!("{endpoint}/v3/kv/deleterange"))
        .json(&json!({"key": b64.encode(prefix), "range_end": b64.encode(&end)}))
        .send()
        .await
        .unwrap();
    assert!(rsp.status().is_success(), "{:?}", rsp.text().await);
}

async fn users_answer(client: &reqwest::Client) -> Option<String> {
    let rsp = client.get("http://user/users/1").send().await.ok()?;
    if !rsp.status().is_success() {
        return None;
    }
    let body: Value = rsp.json().await.ok()?;
    body["served_by"].as_str().map(String::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_that_drops_the_old_root_heals_within_seconds() {
    let mut mesh = Mesh::start(78, "1h").await;
    let refresh = ["--bundle-refresh", "2s"];
    let mut u1 = mesh.pod_with("user", "u1", 11, &refresh).await;
    let order = mesh.pod_with("order", "o1", 21, &refresh).await;
    let client = mesh.via(&order);
    eventually("order reaches user", Duration::from_secs(20), || async {
        users_answer(&client).await.is_some()
    })
    .await;

    // A new CA, and only its root in the bundle: the old one is dropped.
    let ca2 = mesh.dir.path().join("ca2");
    let out = std::process::Command::new(signpost_bin())
        .args(["ca", "init", "--dir", &ca2.display().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let etcd = mesh.etcd().endpoint();
    mesh.restart_server(|args| {
        let at = args.iter().position(|a| a == "--ca-dir").unwrap();
        args[at + 1] = ca2.display().to_string();
    })
    .await;
    etcd_delete_prefix(&etcd, "/signpost/ca/roots/").await;
    // Published again by a restart: the new root alone.
    mesh.restart_server(|_| {}).await;
    let roots = reqwest::get(format!("{}/v1/ca/roots", mesh.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(roots.matches("BEGIN CERTIFICATE").count(), 1, "{roots}");

    // A new instance, certified by the new CA only, takes over from u1:
    // order's old certificate means nothing to it, so order must have got a
    // new one by itself.
    let _u2 = mesh.pod_with("user", "u2", 12, &refresh).await;
    u1.sidecar.kill();
    u1.app.kill();
    eventually(
        "order reaches the new instance again",
        Duration::from_secs(30),
        || async { users_answer(&client).await.as_deref() == Some("u2") },
    )
    .await;
    for i in 0..20 {
        assert_eq!(
            users_answer(&client).await.as_deref(),
            Some("u2"),
            "request {i} after the recovery"
        );
    }
    assert!(
        order
            .sidecar
            .output()
            .contains("no longer holds this sidecar's CA"),
        "order's sidecar did not see its CA dropped"
    );
}
