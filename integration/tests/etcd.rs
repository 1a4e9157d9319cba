//! The control plane and DNS replicas against etcd as it is run in
//! production and as it fails: TLS with client certificates, an etcd user,
//! an etcd that goes away, a replica started before etcd, and `--allow-query`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use signpost_integration::{
    ADMIN, EtcdProcess, Process, dig, dig_short, eventually, free_port, signpost_bin, spawn_server,
    wait_http_ok,
};

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A `signpost server` on free ports with `extra` flags.
/// A `signpost dns` replica on a free port, with `/readyz` on another.
fn spawn_replica(
    name: &str,
    etcd: &str,
    extra: &[&str],
    dir: &Path,
) -> (Process, SocketAddr, String) {
    let dns_port = free_port();
    let metrics_port = free_port();
    let mut args = strings(&[
        "dns",
        "--etcd",
        etcd,
        "--dns",
        &format!("127.0.0.1:{dns_port}"),
        "--metrics",
        &format!("127.0.0.1:{metrics_port}"),
        "--udp-sockets",
        "1",
    ]);
    args.extend(strings(extra));
    (
        Process::spawn(name, &signpost_bin(), &args, dir),
        format!("127.0.0.1:{dns_port}").parse().unwrap(),
        format!("http://127.0.0.1:{metrics_port}/readyz"),
    )
}

async fn register(api: &str, id: &str, address: &str) -> reqwest::StatusCode {
    reqwest::Client::new()
        .put(format!("{api}/v1/services/user/instances/{id}"))
        .bearer_auth(ADMIN)
        .json(&json!({"address": address, "port": 8080}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map(|r| r.status())
        .unwrap_or(reqwest::StatusCode::REQUEST_TIMEOUT)
}

async fn status_of(url: &str) -> Option<u16> {
    reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// The rcode dig reports (`NOERROR`, `SERVFAIL`, ...).
fn dig_status(server: SocketAddr, name: &str, extra: &[&str]) -> String {
    let at = format!("@{}", server.ip());
    let port = server.port().to_string();
    let mut args = vec![at.as_str(), "-p", port.as_str(), name, "A"];
    args.extend(extra);
    let out = dig(&args);
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no answer")
        .to_string()
}

/// Waits until `process` exits; its exit code.
fn exit_code(process: &mut Process, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !process.is_running() {
            return Some(1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_replica_use_etcd_over_tls_with_client_certificates() {
    let etcd = EtcdProcess::spawn_tls().await;
    let files = etcd.tls_files().unwrap().clone();
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &Path| p.display().to_string();
    let (ca, cert, key) = (
        path(&files.ca),
        path(&files.client_cert),
        path(&files.client_key),
    );
    let tls = [
        "--etcd-cacert",
        ca.as_str(),
        "--etcd-cert",
        cert.as_str(),
        "--etcd-key",
        key.as_str(),
    ];
    let server = spawn_server("server-tls", &etcd.endpoint(), &tls, dir.path());
    wait_http_ok(&format!("{}/readyz", server.api), Duration::from_secs(15)).await;
    assert_eq!(register(&server.api, "u1", "10.7.0.1").await, 200);
    eventually("u1 in the server's DNS", Duration::from_secs(5), || async {
        dig_short(server.dns, "user.xingren.host", "A", false) == ["10.7.0.1"]
    })
    .await;
    let (_replica, replica_dns, replica_ready) =
        spawn_replica("replica-tls", &etcd.endpoint(), &tls, dir.path());
    wait_http_ok(&replica_ready, Duration::from_secs(15)).await;
    assert_eq!(
        dig_short(replica_dns, "user.xingren.host", "A", false),
        ["10.7.0.1"]
    );

    // The right CA but no client certificate: etcd refuses the handshake.
    // The server stays up, says why, is not ready and answers 503.
    let anonymous = spawn_server(
        "server-no-cert",
        &etcd.endpoint(),
        &["--etcd-cacert", ca.as_str()],
        dir.path(),
    );
    eventually("a warning about etcd", Duration::from_secs(15), || async {
        anonymous.process.output().contains("does not answer yet")
    })
    .await;
    for line in anonymous.process.output().lines() {
        if line.contains("does not answer yet") {
            println!("without a client certificate: {line}");
        }
    }
    assert_eq!(
        status_of(&format!("{}/readyz", anonymous.api)).await,
        Some(503)
    );
    assert_eq!(register(&anonymous.api, "u2", "10.7.0.2").await, 503);

    // Plain http:// to it with TLS flags, and https:// without a CA, are
    // configuration errors, reported at once.
    let plain = etcd.endpoint().replace("https://", "http://");
    let mut wrong = spawn_server("server-http", &plain, &tls, dir.path());
    assert!(exit_code(&mut wrong.process, Duration::from_secs(10)).is_some());
    assert!(
        wrong.process.output().contains("use https://"),
        "{}",
        wrong.process.output()
    );
    let mut no_ca = spawn_server("server-no-ca", &etcd.endpoint(), &[], dir.path());
    assert!(exit_code(&mut no_ca.process, Duration::from_secs(10)).is_some());
    assert!(
        no_ca.process.output().contains("--etcd-cacert"),
        "{}",
        no_ca.process.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_replica_authenticate_as_an_etcd_user() {
    let etcd = EtcdProcess::spawn().await;
    etcd.enable_auth("signpost", "signpost-secret", "/signpost/")
        .await;

    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("etcd-password");
    std::fs::write(&good, "signpost-secret\n").unwrap();
    let bad = dir.path().join("wrong-password");
    std::fs::write(&bad, "guess\n").unwrap();
    let (good, bad) = (good.display().to_string(), bad.display().to_string());
    let user = [
        "--etcd-user",
        "signpost",
        "--etcd-password-file",
        good.as_str(),
    ];

    let server = spawn_server("server-user", &etcd.endpoint(), &user, dir.path());
    wait_http_ok(&format!("{}/readyz", server.api), Duration::from_secs(15)).await;
    assert_eq!(register(&server.api, "u1", "10.8.0.1").await, 200);
    let (_replica, replica_dns, replica_ready) =
        spawn_replica("replica-user", &etcd.endpoint(), &user, dir.path());
    wait_http_ok(&replica_ready, Duration::from_secs(15)).await;
    eventually(
        "u1 in the replica's DNS",
        Duration::from_secs(5),
        || async { dig_short(replica_dns, "user.xingren.host", "A", false) == ["10.8.0.1"] },
    )
    .await;

    // A wrong password, or none: the process exits and says why.
    let mut wrong = spawn_server(
        "server-wrong-password",
        &etcd.endpoint(),
        &[
            "--etcd-user",
            "signpost",
            "--etcd-password-file",
            bad.as_str(),
        ],
        dir.path(),
    );
    assert!(exit_code(&mut wrong.process, Duration::from_secs(15)).is_some());
    assert!(
        wrong
            .process
            .output()
            .contains("etcd refused user \"signpost\""),
        "{}",
        wrong.process.output()
    );
    let (mut anonymous, _, _) =
        spawn_replica("replica-anonymous", &etcd.endpoint(), &[], dir.path());
    assert!(exit_code(&mut anonymous, Duration::from_secs(15)).is_some());
    assert!(
        anonymous.output().contains("refused signpost"),
        "{}",
        anonymous.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_is_logged_once_and_writes_fail_fast() {
    let mut etcd = EtcdProcess::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server("server-outage", &etcd.endpoint(), &[], dir.path());
    wait_http_ok(&format!("{}/readyz", server.api), Duration::from_secs(15)).await;
    assert_eq!(register(&server.api, "u1", "10.9.0.1").await, 200);
    let lines_before = server.process.output().lines().count();

    etcd.stop();
    // Writes every 100 ms for 6 s: each answers 503 within 2 s.
    let started = Instant::now();
    let mut writes = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let sent = Instant::now();
        let status = register(&server.api, "u2", "10.9.0.2").await;
        assert_eq!(status, 503, "a write with etcd down");
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "a failing write took {:?}",
            sent.elapsed()
        );
        writes += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = server.process.output();
    let outage_lines: Vec<&str> = during.lines().skip(lines_before).collect();
    let lost = outage_lines
        .iter()
        .filter(|l| l.contains("etcd: unreachable"))
        .count();
    assert_eq!(lost, 1, "{}", outage_lines.join("\n"));
    println!(
        "etcd down 6 s: {writes} writes answered 503, {} log lines",
        outage_lines.len()
    );
    // The state change, the catalog watch, and the API's 503s are a
    // handful of lines, not one per attempt.
    assert!(
        outage_lines.len() <= 12,
        "{} log lines for {writes} writes in 6 s:\n{}",
        outage_lines.len(),
        outage_lines.join("\n")
    );

    etcd.start().await;
    eventually("writes succeed again", Duration::from_secs(10), || async {
        register(&server.api, "u2", "10.9.0.2").await == 200
    })
    .await;
    eventually("u2 in DNS", Duration::from_secs(5), || async {
        dig_short(server.dns, "user.xingren.host", "A", false) == ["10.9.0.1", "10.9.0.2"]
    })
    .await;
    assert_eq!(
        server
            .process
            .output()
            .matches("etcd: reachable again")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_never_synced_answers_servfail_until_etcd_comes() {
    let mut etcd = EtcdProcess::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server("server", &etcd.endpoint(), &[], dir.path());
    wait_http_ok(&format!("{}/readyz", server.api), Duration::from_secs(15)).await;
    assert_eq!(register(&server.api, "u1", "10.10.0.1").await, 200);
    etcd.stop();

    let (_replica, dns, ready) = spawn_replica("replica", &etcd.endpoint(), &[], dir.path());
    eventually(
        "the replica serves DNS",
        Duration::from_secs(15),
        || async { dig_status(dns, "user.xingren.host", &[]) != "no answer" },
    )
    .await;
    for name in ["user.xingren.host", "nothing.xingren.host", "xingren.host"] {
        assert_eq!(dig_status(dns, name, &[]), "SERVFAIL", "{name} over UDP");
        assert_eq!(
            dig_status(dns, name, &["+tcp"]),
            "SERVFAIL",
            "{name} over TCP"
        );
    }
    assert_eq!(status_of(&ready).await, Some(503));

    etcd.start().await;
    eventually(
        "the replica answers u1",
        Duration::from_secs(10),
        || async { dig_short(dns, "user.xingren.host", "A", false) == ["10.10.0.1"] },
    )
    .await;
    assert_eq!(
        dig_short(dns, "user.xingren.host", "A", true),
        ["10.10.0.1"]
    );
    assert_eq!(dig_status(dns, "nothing.xingren.host", &[]), "NXDOMAIN");
    assert_eq!(status_of(&ready).await, Some(200));

    // Once synced, etcd going away changes nothing for DNS.
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        dig_short(dns, "user.xingren.host", "A", false),
        ["10.10.0.1"]
    );
    assert_eq!(status_of(&ready).await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_query_refuses_clients_outside_it() {
    let etcd = EtcdProcess::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(
        "server-acl",
        &etcd.endpoint(),
        &["--allow-query", "127.0.0.2/32"],
        dir.path(),
    );
    wait_http_ok(&format!("{}/readyz", server.api), Duration::from_secs(15)).await;
    assert_eq!(register(&server.api, "u1", "10.11.0.1").await, 200);
    let (_replica, replica_dns, ready) = spawn_replica(
        "replica-acl",
        &etcd.endpoint(),
        &["--allow-query", "127.0.0.2"],
        dir.path(),
    );
    wait_http_ok(&ready, Duration::from_secs(15)).await;
    for dns in [server.dns, replica_dns] {
        eventually(
            "u1 answered to 127.0.0.2",
            Duration::from_secs(5),
            || async { dig_status(dns, "user.xingren.host", &["-b", "127.0.0.2"]) == "NOERROR" },
        )
        .await;
        let at = format!("@{}", dns.ip());
        let port = dns.port().to_string();
        for tcp in [false, true] {
            let proto: &[&str] = if tcp { &["+tcp"] } else { &[] };
            let from_allowed: Vec<&str> = [proto, &["-b", "127.0.0.2"]].concat();
            assert_eq!(dig_status(dns, "user.xingren.host", proto), "REFUSED");
            assert_eq!(dig_status(dns, "example.com", proto), "REFUSED");
            assert_eq!(
                dig_status(dns, "user.xingren.host", &from_allowed),
                "NOERROR"
            );
            let mut args = vec![at.as_str(), "-p", port.as_str(), "user.xingren.host", "A"];
            args.extend(&from_allowed);
            args.push("+short");
            assert_eq!(dig(&args).trim(), "10.11.0.1", "tcp={tcp}");
        }
    }
}
