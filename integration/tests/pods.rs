//! Pods in network namespaces resolve services by short name through their
//! resolv.conf, which names a `signpost dns` replica on the bridge address.

use std::time::Duration;

use serde_json::json;
use signpost_integration::netns::{self, Network};
use signpost_integration::{
    ADMIN, EtcdProcess, Process, Server, eventually, free_port, signpost_bin, spawn_server,
    wait_http_ok,
};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn getent(pod: &netns::Pod, name: &str) -> String {
    let out = pod.exec(&["getent", "hosts", name]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_resolve_short_names_and_forward_the_rest() {
    if let Some(reason) = netns::unavailable() {
        eprintln!("SKIPPED pods_resolve_short_names_and_forward_the_rest: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = signpost_bin();
    let etcd = EtcdProcess::spawn().await;
    let Server {
        api,
        process: _server,
        ..
    } = spawn_server("signpost-server", &etcd.endpoint(), &[], dir.path());
    // The "outside world": another Signpost serving zone upstream.test on
    // loopback, which the pods' DNS forwards to.
    let up_api_port = free_port();
    let up_dns_port = free_port();
    let _upstream = Process::spawn(
        "upstream",
        &bin,
        &args(&[
            "server",
            "--dev",
            "--zone",
            "upstream.test",
            "--api",
            &format!("127.0.0.1:{up_api_port}"),
            "--dns",
            &format!("127.0.0.1:{up_dns_port}"),
        ]),
        dir.path(),
    );
    let up_api = format!("http://127.0.0.1:{up_api_port}");
    wait_http_ok(&format!("{api}/readyz"), Duration::from_secs(15)).await;
    wait_http_ok(&format!("{up_api}/readyz"), Duration::from_secs(15)).await;

    let tag = (std::process::id() % 2000) as u16;
    let mut net = Network::create(tag).expect("create the test bridge");
    let gateway = net.gateway();
    let resolv =
        format!("nameserver {gateway}\nsearch xingren.host\noptions timeout:1 attempts:2\n");
    let pod_a = net.add_pod(1, &resolv).expect("pod a");
    let pod_b = net.add_pod(2, &resolv).expect("pod b");

    // The node-local DNS replica: port 53 on the bridge address, since
    // resolv.conf cannot name a port.
    let _dns = Process::spawn(
        "signpost-dns",
        &bin,
        &args(&[
            "dns",
            "--etcd",
            &etcd.endpoint(),
            "--dns",
            &format!("{gateway}:53"),
            "--upstream",
            &format!("127.0.0.1:{up_dns_port}"),
            "--allow-recursion",
            &net.cidr(),
            "--udp-sockets",
            "1",
        ]),
        dir.path(),
    );

    let http = reqwest::Client::new();
    let resp = http
        .put(format!("{api}/v1/services/user/instances/a"))
        .bearer_auth(ADMIN)
        .json(&json!({"address": pod_a.address.to_string(), "port": 8080}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let resp = http
        .put(format!("{up_api}/v1/services/web/instances/w1"))
        .json(&json!({"address": "192.0.2.7", "port": 80}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());

    let want = pod_a.address.to_string();
    eventually(
        "pod b resolves `user` through the search domain",
        Duration::from_secs(15),
        || {
            let line = getent(&pod_b, "user");
            let want = want.clone();
            async move { line.starts_with(&want) && line.contains("user.xingren.host") }
        },
    )
    .await;
    // The full name works too, from either pod.
    assert!(getent(&pod_a, "user.xingren.host").starts_with(&want));
    // A name outside the zone goes to the upstream.
    eventually("forwarded name resolves", Duration::from_secs(10), || {
        let line = getent(&pod_b, "web.upstream.test");
        async move { line.starts_with("192.0.2.7") }
    })
    .await;
    // An unknown name in the zone does not resolve.
    assert!(getent(&pod_b, "nobody.xingren.host").is_empty());
}

/// Two DNS replicas in the pods' resolv.conf (`options timeout:1
/// attempts:2`, as examples/resolv.conf): one is killed, and `getent hosts
/// user` keeps answering through the other, changes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_dns_replica_leaves_lookups_to_the_other() {
    if let Some(reason) = netns::unavailable() {
        eprintln!("SKIPPED a_killed_dns_replica_leaves_lookups_to_the_other: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = signpost_bin();
    let etcd = EtcdProcess::spawn().await;
    let Server {
        api,
        process: _server,
        ..
    } = spawn_server("signpost-server", &etcd.endpoint(), &[], dir.path());
    wait_http_ok(&format!("{api}/readyz"), Duration::from_secs(15)).await;

    // Its own bridge: this test may run beside the other one.
    let tag = (std::process::id() % 2000) as u16 + 2000;
    let mut net = Network::create(tag).expect("create the test bridge");
    let first = net.gateway();
    let second = net.add_node_address(2).expect("second node address");
    let resolv = format!(
        "nameserver {first}\nnameserver {second}\nsearch xingren.host\noptions timeout:1 attempts:2\n"
    );
    let pod = net.add_pod(1, &resolv).expect("pod");
    let replica = |name: &str, at: std::net::Ipv4Addr| {
        Process::spawn(
            name,
            &bin,
            &args(&[
                "dns",
                "--etcd",
                &etcd.endpoint(),
                "--dns",
                &format!("{at}:53"),
                "--nsid",
                name,
                "--allow-recursion",
                &net.cidr(),
                "--udp-sockets",
                "1",
            ]),
            dir.path(),
        )
    };
    let mut dns_a = replica("dns-a", first);
    let _dns_b = replica("dns-b", second);

    let http = reqwest::Client::new();
    let register = |id: &'static str, address: &'static str| {
        let http = http.clone();
        let api = api.clone();
        async move {
            let resp = http
                .put(format!("{api}/v1/services/user/instances/{id}"))
                .bearer_auth(ADMIN)
                .json(&json!({"address": address, "port": 8080}))
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success());
        }
    };
    register("a", "10.99.0.1").await;
    // Both replicas answer, each telling its own id.
    for (at, id) in [(first, "dns-a"), (second, "dns-b")] {
        let server = format!("@{at}");
        eventually(&format!("{id} answers"), Duration::from_secs(15), || {
            let out = signpost_integration::dig(&[&server, "+short", "user.xingren.host"]);
            async move { out.trim() == "10.99.0.1" }
        })
        .await;
        let nsid = signpost_integration::dig(&[&server, "+short", "CH", "TXT", "id.server"]);
        assert_eq!(nsid.trim(), format!("\"{id}\""));
    }
    eventually("the pod resolves `user`", Duration::from_secs(10), || {
        let line = getent(&pod, "user");
        async move { line.starts_with("10.99.0.1") }
    })
    .await;

    // The first replica dies; the pod's lookups go on through the second.
    dns_a.kill();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let line = getent(&pod, "user");
        assert!(line.starts_with("10.99.0.1"), "{line:?}");
        // A dead first nameserver costs at most its 1 s timeout per try.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    // And changes keep arriving through it.
    register("b", "10.99.0.2").await;
    eventually(
        "the second instance, through the live replica",
        Duration::from_secs(10),
        || {
            let line = getent(&pod, "b.user.xingren.host");
            async move { line.starts_with("10.99.0.2") }
        },
    )
    .await;
}
