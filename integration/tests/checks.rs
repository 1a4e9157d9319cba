//! Health checks shared among control planes: two `signpost server`
//! processes on one real etcd split the check shards, and when one is
//! killed (SIGKILL) the other takes its share within seconds.

use std::time::{Duration, Instant};

use serde_json::json;
use signpost_integration::{EtcdProcess, Process, free_port, signpost_bin, wait_http_ok};

const TOKEN: &str = "checks-admin-token-0123456789abcdef";
const SHARDS: i64 = 32;

/// A gauge's value from a Prometheus text page.
fn gauge(page: &str, name: &str) -> Option<i64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn shards_held(api: &str) -> Option<i64> {
    let page = reqwest::get(format!("{api}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    gauge(&page, "signpost_health_shards_held")
}

fn server(name: &str, etcd: &str, dir: &std::path::Path) -> (Process, String) {
    let port = free_port();
    let args: Vec<String> = [
        "server",
        "--etcd",
        etcd,
        "--api",
        &format!("127.0.0.1:{port}"),
        "--dns",
        &format!("127.0.0.1:{}", free_port()),
        "--admin-token-file",
        &dir.join("admin.token").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    (
        Process::spawn(name, &signpost_bin(), &args, dir),
        format!("http://127.0.0.1:{port}"),
    )
}

async fn health_of(api: &str, id: &str) -> Option<String> {
    let v: serde_json::Value = reqwest::get(format!("{api}/v1/services/web"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let list = v.as_array().or_else(|| v["instances"].as_array())?;
    list.iter()
        .find(|i| i["id"] == id)
        // Only what a probe wrote: a checked instance is critical from
        // the start, before any replica probed it.
        .filter(|i| {
            i["health"]["output"]
                .as_str()
                .is_some_and(|o| o.contains("TCP connect"))
        })
        .and_then(|i| i["health"]["status"].as_str().map(String::from))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_shards_move_to_the_survivor_when_a_control_plane_is_killed() {
    let etcd = EtcdProcess::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.token"), TOKEN).unwrap();
    let (mut a, api_a) = server("server-a", &etcd.endpoint(), dir.path());
    let (b, api_b) = server("server-b", &etcd.endpoint(), dir.path());
    wait_http_ok(&format!("{api_a}/readyz"), Duration::from_secs(20)).await;
    wait_http_ok(&format!("{api_b}/readyz"), Duration::from_secs(20)).await;

    // Both hold a share, and together every shard.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut ha, mut hb) = (None, None);
    while Instant::now() < deadline {
        ha = shards_held(&api_a).await;
        hb = shards_held(&api_b).await;
        if let (Some(x), Some(y)) = (ha, hb)
            && x > 0
            && y > 0
            && x + y == SHARDS
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (Some(x), Some(y)) = (ha, hb) else {
        panic!("no shard metrics: {ha:?} {hb:?}");
    };
    assert!(x > 0 && y > 0 && x + y == SHARDS, "shares {x} + {y}");

    // Checked instances on a port nothing listens on: whichever server
    // holds each one's shard makes it critical.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let http = reqwest::Client::new();
    let register = |id: String| {
        let http = http.clone();
        let api = api_b.clone();
        async move {
            let rsp = http
                .put(format!("{api}/v1/services/web/instances/{id}"))
                .bearer_auth(TOKEN)
                .json(&json!({
                    "address": "127.0.0.1",
                    "port": dead_port,
                    "check": {"tcp": format!("127.0.0.1:{dead_port}"), "interval": "1s", "timeout": "500ms"},
                }))
                .send()
                .await
                .unwrap();
            assert!(rsp.status().is_success(), "{:?}", rsp.text().await);
        }
    };
    for i in 0..16 {
        register(format!("w{i}")).await;
    }

    // Kill A: B takes every shard.
    a.kill();
    let killed = Instant::now();
    let mut took = None;
    while killed.elapsed() < Duration::from_secs(15) {
        if shards_held(&api_b).await == Some(SHARDS) {
            took = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(took) = took else {
        panic!(
            "B holds {:?} shards 15 s after A was killed\n{}",
            shards_held(&api_b).await,
            b.output()
        );
    };
    eprintln!("the survivor held every shard {took:?} after the kill");
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // And checks them: instances registered now, in any shard, go critical.
    for i in 16..32 {
        register(format!("w{i}")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut missing = Vec::new();
    while Instant::now() < deadline {
        missing.clear();
        for i in 0..32 {
            let id = format!("w{i}");
            if health_of(&api_b, &id).await.as_deref() != Some("critical") {
                missing.push(id);
            }
        }
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        missing.is_empty(),
        "not critical: {missing:?}\n{}",
        b.output()
    );
}
