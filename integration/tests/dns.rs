//! DNS end to end: a real etcd, a real `signpost server` and a `signpost dns`
//! replica, queried with `dig` over UDP and TCP.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use signpost_integration::{
    EtcdProcess, Process, dig, dig_short, eventually, free_port, signpost_bin, wait_http_ok,
};

const ADMIN: &str = "integration-admin-token-0123456789";

struct Cluster {
    etcd: EtcdProcess,
    server: Process,
    api: String,
    dns: SocketAddr,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    let etcd = EtcdProcess::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.token"), ADMIN).unwrap();
    let api_port = free_port();
    let dns_port = free_port();
    let args: Vec<String> = [
        "server",
        "--etcd",
        &etcd.endpoint(),
        "--api",
        &format!("127.0.0.1:{api_port}"),
        "--dns",
        &format!("127.0.0.1:{dns_port}"),
        "--admin-token-file",
        &dir.path().join("admin.token").display().to_string(),
        "--udp-sockets",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Process::spawn("signpost-server", &signpost_bin(), &args, dir.path());
    let api = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{api}/readyz"), Duration::from_secs(15)).await;
    Cluster {
        etcd,
        server,
        api,
        dns: format!("127.0.0.1:{dns_port}").parse().unwrap(),
        http: reqwest::Client::new(),
        dir,
    }
}

impl Cluster {
    async fn register(&self, svc: &str, id: &str, body: serde_json::Value) {
        let resp = self
            .http
            .put(format!("{}/v1/services/{svc}/instances/{id}", self.api))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "register {svc}/{id}: {}",
            resp.status()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_registered_instances_over_udp_and_tcp() {
    let c = cluster().await;
    c.register(
        "user",
        "u1",
        json!({"address": "10.1.0.1", "port": 8080, "tags": ["v1"], "ports": {"http": 8081}, "meta": {"zone": "a"}}),
    )
    .await;
    c.register(
        "user",
        "u2",
        json!({"address": "10.1.0.2", "port": 8080, "weight": 5}),
    )
    .await;

    eventually("both users in DNS", Duration::from_secs(5), || async {
        dig_short(c.dns, "user.xingren.host", "A", false) == ["10.1.0.1", "10.1.0.2"]
    })
    .await;
    assert_eq!(
        dig_short(c.dns, "user.xingren.host", "A", true),
        ["10.1.0.1", "10.1.0.2"]
    );
    assert_eq!(
        dig_short(c.dns, "user.xingren.host", "SRV", false),
        [
            "10 100 8080 u1.user.xingren.host.",
            "10 5 8080 u2.user.xingren.host."
        ]
    );
    assert_eq!(
        dig_short(c.dns, "_http._tcp.user.xingren.host", "SRV", true),
        ["10 100 8081 u1.user.xingren.host."]
    );
    assert_eq!(
        dig_short(c.dns, "v1.tag.user.xingren.host", "A", false),
        ["10.1.0.1"]
    );
    assert_eq!(
        dig_short(c.dns, "u1.user.xingren.host", "TXT", false),
        ["\"zone=a\""]
    );
    assert_eq!(
        dig_short(c.dns, "1.0.1.10.in-addr.arpa", "PTR", false),
        ["u1.user.xingren.host."]
    );
    assert_eq!(
        dig_short(c.dns, "_services._dns-sd._udp.xingren.host", "PTR", false),
        ["_user._tcp.xingren.host."]
    );

    // SRV carries glue in the additional section.
    let port = c.dns.port().to_string();
    let full = dig(&["@127.0.0.1", "-p", &port, "user.xingren.host", "SRV"]);
    assert!(full.contains(";; ADDITIONAL SECTION:"), "{full}");
    assert!(
        full.contains("u1.user.xingren.host.\t5\tIN\tA\t10.1.0.1"),
        "{full}"
    );

    // NXDOMAIN vs NODATA, both with the SOA in authority.
    let nx = dig(&["@127.0.0.1", "-p", &port, "nobody.xingren.host", "A"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(nx.contains("SOA"), "{nx}");
    let nodata = dig(&["@127.0.0.1", "-p", &port, "user.xingren.host", "MX"]);
    assert!(nodata.contains("status: NOERROR"), "{nodata}");
    assert!(nodata.contains("ANSWER: 0"), "{nodata}");
    assert!(nodata.contains("SOA"), "{nodata}");

    // Deregistration leaves DNS.
    let resp = c
        .http
        .delete(format!("{}/v1/services/user/instances/u2", c.api))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    eventually("u2 gone from DNS", Duration::from_secs(5), || async {
        dig_short(c.dns, "user.xingren.host", "A", false) == ["10.1.0.1"]
    })
    .await;
    drop(c.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_leaves_dns() {
    let c = cluster().await;
    c.register(
        "lease",
        "l1",
        json!({"address": "10.2.0.1", "port": 80, "ttl": "2s"}),
    )
    .await;
    eventually("l1 in DNS", Duration::from_secs(5), || async {
        dig_short(c.dns, "lease.xingren.host", "A", false) == ["10.2.0.1"]
    })
    .await;
    eventually("l1 gone after its ttl", Duration::from_secs(6), || async {
        dig_short(c.dns, "lease.xingren.host", "A", false).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_keeps_answering_while_etcd_is_down_and_resyncs() {
    let mut c = cluster().await;
    // A DNS-only replica with its own watch.
    let replica_port = free_port();
    let replica_dns: SocketAddr = format!("127.0.0.1:{replica_port}").parse().unwrap();
    let args: Vec<String> = [
        "dns",
        "--etcd",
        &c.etcd.endpoint(),
        "--dns",
        &replica_dns.to_string(),
        "--udp-sockets",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut replica = Process::spawn("signpost-dns", &signpost_bin(), &args, c.dir.path());

    c.register("user", "u1", json!({"address": "10.3.0.1", "port": 80}))
        .await;
    for dns in [c.dns, replica_dns] {
        eventually("u1 in DNS", Duration::from_secs(10), || async {
            dig_short(dns, "user.xingren.host", "A", false) == ["10.3.0.1"]
        })
        .await;
    }

    c.etcd.stop();
    // Writes fail fast with 503; DNS answers from the last snapshot.
    let started = std::time::Instant::now();
    let resp = c
        .http
        .put(format!("{}/v1/services/user/instances/u2", c.api))
        .bearer_auth(ADMIN)
        .json(&json!({"address": "10.3.0.2", "port": 80}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "503 took {:?}",
        started.elapsed()
    );
    let resp = c
        .http
        .get(format!("{}/readyz", c.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    for dns in [c.dns, replica_dns] {
        assert_eq!(
            dig_short(dns, "user.xingren.host", "A", false),
            ["10.3.0.1"]
        );
        assert_eq!(dig_short(dns, "user.xingren.host", "A", true), ["10.3.0.1"]);
    }
    assert!(replica.is_running() && c.server.is_running());

    c.etcd.start().await;
    eventually("the API writes again", Duration::from_secs(20), || async {
        c.http
            .put(format!("{}/v1/services/user/instances/u2", c.api))
            .bearer_auth(ADMIN)
            .json(&json!({"address": "10.3.0.2", "port": 80}))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    for dns in [c.dns, replica_dns] {
        eventually(
            "u2 visible after etcd is back",
            Duration::from_secs(20),
            || async {
                dig_short(dns, "user.xingren.host", "A", false) == ["10.3.0.1", "10.3.0.2"]
            },
        )
        .await;
    }
    assert_eq!(replica.terminate(Duration::from_secs(5)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_registers_and_lists() {
    let c = cluster().await;
    let run = |args: &[&str]| {
        std::process::Command::new(signpost_bin())
            .args(args)
            .env("SIGNPOST_ADDR", &c.api)
            .env("SIGNPOST_TOKEN", ADMIN)
            .output()
            .unwrap()
    };
    let out = run(&[
        "register",
        "user",
        "--id",
        "u1",
        "--address",
        "10.4.0.1",
        "--port",
        "8080",
        "--tag",
        "v1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("listed", Duration::from_secs(5), || async {
        let out = run(&["services"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains("SERVICE")
            && text
                .lines()
                .any(|l| l.starts_with("user ") && l.contains("1/1") && l.contains("v1"))
    })
    .await;
    let out = run(&["instances", "user"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("10.4.0.1") && text.contains("passing"),
        "{text}"
    );

    // Bad input: exit 1 with the rule named; usage errors: exit 2.
    let out = run(&[
        "register",
        "user",
        "--id",
        "bad_id",
        "--address",
        "10.4.0.1",
        "--port",
        "80",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("a-z, 0-9 and '-'"));
    let out = run(&[
        "register",
        "user",
        "--id",
        "u9",
        "--address",
        "10.4.0.1",
        "--port",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ports are 1 to 65535"));
    let out = run(&["register", "user"]);
    assert_eq!(out.status.code(), Some(2));
    // An unreachable control plane gets an actionable message.
    let out = std::process::Command::new(signpost_bin())
        .args([
            "services",
            "--control-plane",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the control plane") && err.contains("signpost server"),
        "{err}"
    );

    let out = run(&["token", "create", "--service", "order"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .starts_with("sp_")
    );
}

#[test]
fn server_refuses_to_start_without_admin_token() {
    let out = std::process::Command::new(signpost_bin())
        .args(["server", "--api", "127.0.0.1:0", "--dns", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin-token-file"));
}

/// A checked instance starts critical: out of DNS until a probe passes. One
/// whose target is dead never appears; one whose app comes up appears after
/// its first passing probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_instances_enter_dns_on_their_first_passing_probe() {
    let c = cluster().await;
    let dead_port = free_port();
    let late_port = free_port();
    c.register(
        "web",
        "dead",
        json!({"address": "127.0.0.2", "port": dead_port,
               "check": {"tcp": format!(":{dead_port}"), "interval": "1s", "timeout": "500ms"}}),
    )
    .await;
    c.register(
        "web",
        "late",
        json!({"address": "127.0.0.1", "port": late_port,
               "check": {"tcp": format!(":{late_port}"), "interval": "1s", "timeout": "500ms"}}),
    )
    .await;
    // Registered (both listed, critical) but in DNS neither, for several
    // probes' time.
    let view: serde_json::Value = c
        .http
        .get(format!("{}/v1/services/web", c.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let instances = view["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2, "{view}");
    assert!(
        instances
            .iter()
            .all(|i| i["health"]["status"] == "critical"),
        "{view}"
    );
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        assert_eq!(
            dig_short(c.dns, "web.xingren.host", "A", false),
            Vec::<String>::new(),
            "a checked instance is in DNS before any probe passed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The app comes up: after its next probe it is served; the dead one
    // still never is.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", late_port))
        .await
        .unwrap();
    let accept = tokio::spawn(async move { while listener.accept().await.is_ok() {} });
    let up = std::time::Instant::now();
    eventually(
        "the live instance enters DNS",
        Duration::from_secs(5),
        || async {
            let answers = dig_short(c.dns, "web.xingren.host", "A", false);
            assert!(
                !answers.contains(&"127.0.0.2".to_string()),
                "the dead instance is in DNS: {answers:?}"
            );
            answers == ["127.0.0.1"]
        },
    )
    .await;
    eprintln!("served {:?} after its app came up", up.elapsed());
    for _ in 0..10 {
        assert_eq!(
            dig_short(c.dns, "web.xingren.host", "A", false),
            ["127.0.0.1"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    accept.abort();
}

/// `signpost token create --ttl`, `token list` (accessors, never the
/// secret) and `token revoke`, against a real server on etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_creates_lists_and_revokes_tokens() {
    let c = cluster().await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(signpost_bin())
            .args(args)
            .env("SIGNPOST_ADDR", &c.api)
            .env("SIGNPOST_TOKEN", ADMIN)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, token, err) = run(&["token", "create", "--service", "user", "--ttl", "720h"]);
    assert_eq!(code, Some(0), "{err}");
    let token = token.trim().to_string();
    let accessor = err
        .split("accessor ")
        .nth(1)
        .and_then(|rest| rest.split([',', ';']).next())
        .unwrap_or_else(|| panic!("no accessor in {err:?}"))
        .to_string();
    let (code, list, err) = run(&["token", "list"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        list.contains("ACCESSOR") && list.contains("EXPIRES"),
        "{list}"
    );
    let row = list
        .lines()
        .find(|l| l.starts_with(&accessor))
        .unwrap_or_else(|| panic!("{accessor} not in {list}"));
    assert!(row.contains("user") && !row.contains("never"), "{row}");
    assert!(!list.contains(&token), "the list shows the secret: {list}");
    // The token works, is revoked, then is refused.
    let register = |token: String| {
        let http = c.http.clone();
        let api = c.api.clone();
        async move {
            http.put(format!("{api}/v1/services/user/instances/u1"))
                .bearer_auth(token)
                .json(&json!({"address": "10.4.0.1", "port": 80}))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(register(token.clone()).await, 200);
    let (code, out, err) = run(&["token", "revoke", &accessor]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(register(token.clone()).await, 401);
    let (code, _, err) = run(&["token", "revoke", &accessor]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no token has accessor"), "{err}");
}
