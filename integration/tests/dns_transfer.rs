//! The new DNS flags end to end: a `signpost dns` replica watching a real
//! etcd, started with `--allow-transfer`, `--nsid` and `--max-forwards`,
//! read with `dig`.

use std::time::Duration;

use serde_json::json;
use signpost_integration::{
    ADMIN, EtcdProcess, Process, Server, dig, eventually, free_port, signpost_bin, spawn_server,
    wait_http_ok,
};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serves_zone_transfers_and_tells_its_id() {
    let etcd = EtcdProcess::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let Server {
        api,
        process: _server,
        ..
    } = spawn_server("signpost-server", &etcd.endpoint(), &[], dir.path());
    let bin = signpost_bin();
    let dns_port = free_port().to_string();
    let _replica = Process::spawn(
        "signpost-dns",
        &bin,
        &args(&[
            "dns",
            "--etcd",
            &etcd.endpoint(),
            "--dns",
            &format!("127.0.0.1:{dns_port}"),
            "--allow-transfer",
            "127.0.0.1/32",
            "--nsid",
            "replica-1",
            "--max-forwards",
            "10",
            "--udp-sockets",
            "1",
        ]),
        dir.path(),
    );
    wait_http_ok(&format!("{api}/readyz"), Duration::from_secs(15)).await;
    let resp = reqwest::Client::new()
        .put(format!("{api}/v1/services/user/instances/u1"))
        .bearer_auth(ADMIN)
        .json(&json!({"address": "10.1.0.1", "port": 8080, "meta": {"zone": "a"}}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());

    let at = |extra: &[&str]| -> String {
        let mut a = vec!["@127.0.0.1", "-p", dns_port.as_str()];
        a.extend_from_slice(extra);
        dig(&a)
    };
    eventually(
        "the replica transfers the registration",
        Duration::from_secs(15),
        || {
            let out = at(&["xingren.host", "AXFR"]);
            async move { out.contains("u1._user._tcp.xingren.host.") && out.contains("XFR size:") }
        },
    )
    .await;
    let out = at(&["xingren.host", "AXFR"]);
    assert!(out.contains("\"zone=a\""), "{out}");
    assert_eq!(
        at(&["+short", "CH", "TXT", "id.server"]).trim(),
        "\"replica-1\""
    );
    let out = at(&["+nsid", "user.xingren.host"]);
    assert!(out.contains("(\"replica-1\")"), "{out}");
    let out = at(&["+short", "_services._dns-sd._udp.xingren.host", "PTR"]);
    assert_eq!(out.trim(), "_user._tcp.xingren.host.");
}

#[test]
fn bad_transfer_flags_are_refused_with_the_flag_named() {
    let out = std::process::Command::new(signpost_bin())
        .args(["dns", "--allow-transfer", "not-a-cidr"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--allow-transfer \"not-a-cidr\""),
        "{stderr}"
    );
    let out = std::process::Command::new(signpost_bin())
        .args(["dns", "--max-forwards", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-forwards"));
}
