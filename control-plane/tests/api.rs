//! The HTTP API over a real socket, against the in-memory store and (for the
//! store-down and TTL cases) a real etcd.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use reqwest::StatusCode;
use serde_json::{Value, json};
use signpost_control_plane::api::ApiPolicy;
use signpost_control_plane::api::auth::AuthConfig;
use signpost_control_plane::server::{ControlPlane, ControlPlaneOptions};
use signpost_control_plane::store::{EtcdOptions, EtcdStore, Keys, MemoryStore, Store};
use signpost_control_plane::testing::{EtcdProcess, assert_eventually as eventually};
use signpost_control_plane::tokens;
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "admin-token-for-tests-0123456789";

struct Api {
    base: String,
    http: reqwest::Client,
    store: Arc<dyn Store>,
    cancel: CancellationToken,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start(store: Arc<dyn Store>, dev: bool) -> Api {
    start_with_ca(store, dev, None).await
}

async fn start_with_ca(
    store: Arc<dyn Store>,
    dev: bool,
    ca: Option<Arc<signpost_control_plane::api::certs::CertAuthority>>,
) -> Api {
    start_with(store, dev, ca, Default::default()).await
}

async fn start_with(
    store: Arc<dyn Store>,
    dev: bool,
    ca: Option<Arc<signpost_control_plane::api::certs::CertAuthority>>,
    api_policy: ApiPolicy,
) -> Api {
    let cancel = CancellationToken::new();
    let auth = if dev {
        AuthConfig {
            admin_hash: None,
            dev: true,
        }
    } else {
        AuthConfig {
            admin_hash: Some(tokens::hash(ADMIN)),
            dev: false,
        }
    };
    let cp = ControlPlane::start(
        ControlPlaneOptions {
            api: "127.0.0.1:0".parse().unwrap(),
            store: store.clone(),
            keys: Keys::default(),
            auth,
            candidate: "test".into(),
            ca,
            compaction: None,
            api_policy,
        },
        Registry::default(),
        None,
        cancel.clone(),
    )
    .await
    .unwrap();
    assert!(cp.catalog.wait_synced(Duration::from_secs(5)).await);
    Api {
        base: format!("http://{}", cp.api_addr),
        http: reqwest::Client::new(),
        store,
        cancel,
    }
}

async fn memory(dev: bool) -> Api {
    start(Arc::new(MemoryStore::new()), dev).await
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn put(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut req = self.http.put(self.url(path)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn text(&self, path: &str) -> String {
        let resp = self.http.get(self.url(path)).send().await.unwrap();
        resp.text().await.unwrap()
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self.http.get(self.url(path)).send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Everything stored but the health checkers' own shard keys (written
    /// in the background), to show that a refused request changed nothing.
    async fn stored(&self) -> Vec<(String, Vec<u8>)> {
        self.store
            .range("/signpost/")
            .await
            .unwrap()
            .kvs
            .into_iter()
            .filter(|kv| {
                !kv.key.starts_with("/signpost/checkers/")
                    && !kv.key.starts_with("/signpost/election/")
            })
            .map(|kv| (kv.key, kv.value))
            .collect()
    }

    /// Sends `request` as is over a new connection and reads the answer
    /// until the server closes it (send `connection: close`).
    async fn raw(&self, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.base.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    async fn token_for(&self, svc: &str) -> String {
        let resp = self
            .http
            .post(self.url("/v1/tokens"))
            .bearer_auth(ADMIN)
            .json(&json!({"service": svc}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        let body: Value = resp.json().await.unwrap();
        body["token"].as_str().unwrap().to_string()
    }
}

fn reg() -> Value {
    json!({"address": "10.0.0.5", "port": 8080})
}

#[tokio::test]
async fn register_list_get_deregister() {
    let api = memory(true).await;
    let (status, body) = api
        .put(
            "/v1/services/User/instances/U1",
            None,
            json!({"address": "10.0.0.5", "port": 8080, "tags": ["v1"], "meta": {"zone": "a"}, "weight": 7}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["service"], "user");
    assert_eq!(body["id"], "u1");
    assert_eq!(body["weight"], 7);

    eventually("instance listed", Duration::from_secs(2), || async {
        let (_, list) = api.get("/v1/services").await;
        list["services"][0]["name"] == "user" && list["services"][0]["total"] == 1
    })
    .await;
    let (status, svc) = api.get("/v1/services/user").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(svc["instances"][0]["address"], "10.0.0.5");
    assert_eq!(svc["instances"][0]["health"]["status"], "passing");
    assert_eq!(svc["instances"][0]["meta"]["zone"], "a");

    let resp = api
        .http
        .delete(api.url("/v1/services/user/instances/u1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    eventually("instance gone", Duration::from_secs(2), || async {
        let (_, svc) = api.get("/v1/services/user").await;
        svc["instances"].as_array().is_some_and(|a| a.is_empty())
    })
    .await;
    let resp = api
        .http
        .delete(api.url("/v1/services/user/instances/u1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let api = memory(false).await;
    let token = api.token_for("user").await;
    let (status, _) = api
        .put("/v1/services/user/instances/keep", Some(&token), reg())
        .await;
    assert_eq!(status, StatusCode::OK);
    let before = api.stored().await;

    let cases: Vec<(&str, Value, &str)> = vec![
        ("/v1/services/user_x/instances/u1", reg(), "invalid_name"),
        ("/v1/services/user/instances/-u1", reg(), "invalid_name"),
        ("/v1/services/tag/instances/u1", reg(), "invalid_name"),
        ("/v1/services/user/instances/tag", reg(), "invalid_name"),
        (
            "/v1/services/user/instances/u1",
            json!({"address": "not-an-ip", "port": 80}),
            "invalid_registration",
        ),
        (
            "/v1/services/user/instances/u1",
            json!({"address": "10.0.0.1", "port": 0}),
            "invalid_registration",
        ),
        (
            "/v1/services/user/instances/u1",
            json!({"address": "10.0.0.1", "port": 65536}),
            "invalid_registration",
        ),
        (
            "/v1/services/user/instances/u1",
            json!({"address": "10.0.0.1", "port": 80, "weight": 0}),
            "invalid_registration",
        ),
        (
            "/v1/services/user/instances/u1",
            json!({"address": "10.0.0.1", "port": 80, "weight": 65536}),
            "invalid_registration",
        ),
        (
            "/v1/services/user/instances/u1",
            json!({"address": "10.0.0.1", "port": 80, "ttl": "500ms"}),
            "invalid_registration",
        ),
        (
            "/v1/services/user/instances/u1",
            json!({"address": "10.0.0.1", "port": 80, "ttl": "forever"}),
            "invalid_registration",
        ),
        (
            "/v1/services/user/instances/u1",
            json!({"address": "10.0.0.1", "port": 80, "colour": "red"}),
            "invalid_body",
        ),
        (
            "/v1/services/user/instances/u1",
            json!({"port": 80}),
            "invalid_body",
        ),
    ];
    let mut cases = cases;
    for address in [
        "0.0.0.0",
        "::",
        "255.255.255.255",
        "224.0.0.251",
        "ff02::fb",
        "169.254.169.254",
        "fe80::1",
    ] {
        cases.push((
            "/v1/services/user/instances/u1",
            json!({"address": address, "port": 80}),
            "invalid_registration",
        ));
    }
    for meta in [
        json!({"k": "line\nbreak"}),
        json!({"k\u{0}": "v"}),
        json!({"k": "\u{1b}[2J"}),
    ] {
        cases.push((
            "/v1/services/user/instances/u1",
            json!({"address": "10.0.0.1", "port": 80, "meta": meta}),
            "invalid_registration",
        ));
    }
    cases.push((
        "/v1/services/user/instances/u1",
        json!({"address": "10.0.0.1", "port": 80, "tags": ["a\nb"]}),
        "invalid_name",
    ));
    for (path, body, code) in cases {
        let (status, answer) = api.put(path, Some(ADMIN), body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{path} {body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(!message.is_empty());
        if body["address"].as_str().is_some_and(|a| {
            a.contains("::") || a.starts_with('2') || a.starts_with("169") || a.starts_with("0.")
        }) {
            assert!(
                ["unspecified", "broadcast", "multicast", "link-local"]
                    .iter()
                    .any(|rule| message.contains(rule)),
                "{body}: {message}"
            );
        }
        if body["meta"].is_object() {
            assert!(message.contains("control character"), "{body}: {message}");
        }
    }

    // A body over the limit.
    let big = json!({"address": "10.0.0.1", "port": 80, "meta": {"k": "x".repeat(70 * 1024)}});
    let (status, answer) = api
        .put("/v1/services/user/instances/u1", Some(ADMIN), big)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["error"]["code"], "body_too_large", "{answer}");

    // No token, a wrong token, another service's token.
    let (status, answer) = api.put("/v1/services/user/instances/u1", None, reg()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert_eq!(answer["error"]["code"], "unauthorized");
    let (status, _) = api
        .put("/v1/services/user/instances/u1", Some("sp_wrong"), reg())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, answer) = api
        .put("/v1/services/order/instances/o1", Some(&token), reg())
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("service user") && message.contains("order") && !message.contains('('),
        "{message}"
    );
    let resp = api
        .http
        .post(api.url("/v1/tokens"))
        .bearer_auth(&token)
        .json(&json!({"service": "user"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = api
        .http
        .delete(api.url("/v1/services/user/instances/keep"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Heartbeat of an instance that is not there.
    let (status, answer) = api
        .put(
            "/v1/services/user/instances/nope/heartbeat",
            Some(&token),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");

    assert_eq!(
        api.stored().await,
        before,
        "a refused request changed the store"
    );
}

#[tokio::test]
async fn size_limits_are_refused_naming_the_limit() {
    let api = memory(false).await;
    let (status, _) = api
        .put("/v1/services/user/instances/keep", Some(ADMIN), reg())
        .await;
    assert_eq!(status, StatusCode::OK);
    let before = api.stored().await;
    let with = |field: &str, value: Value| {
        let mut body = json!({"address": "10.0.0.1", "port": 80});
        body[field] = value;
        body
    };
    let many = |n: usize, value: &dyn Fn(usize) -> Value| -> serde_json::Map<String, Value> {
        (0..n).map(|i| (format!("k{i}"), value(i))).collect()
    };
    let tags = |n: usize, len: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("t{i:02}{}", "a".repeat(len.saturating_sub(3))))
            .collect()
    };
    let cases: Vec<(Value, &str)> = vec![
        (with("meta", json!(many(65, &|_| json!("v")))), "64"),
        (with("meta", json!({"k".repeat(129): "v"})), "128"),
        (with("meta", json!({"k": "v".repeat(513)})), "512"),
        (with("tags", json!(tags(65, 3))), "64"),
        (with("ports", json!(many(65, &|i| json!(1000 + i)))), "64"),
        (
            {
                // Each part within its own limit, the whole past 16 KiB.
                let mut body = with("meta", json!(many(64, &|_| json!("v".repeat(240)))));
                body["tags"] = json!(tags(64, 63));
                body
            },
            "16384",
        ),
    ];
    for (body, limit) in cases {
        let (status, answer) = api
            .put("/v1/services/user/instances/u1", Some(ADMIN), body)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(answer["error"]["code"], "invalid_registration", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("the limit is {limit}")),
            "{message:?} does not name the limit {limit}"
        );
    }
    assert_eq!(
        api.stored().await,
        before,
        "a refused request changed the store"
    );
    // At the limits: taken.
    let body = with("meta", json!(many(64, &|_| json!("v"))));
    let (status, answer) = api
        .put("/v1/services/user/instances/u1", Some(ADMIN), body)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

#[tokio::test]
async fn service_tokens_are_stored_as_hashes_only() {
    let api = memory(false).await;
    let token = api.token_for("user").await;
    let stored: Vec<_> = api
        .stored()
        .await
        .into_iter()
        .filter(|(k, _)| k.starts_with("/signpost/tokens/"))
        .collect();
    assert_eq!(stored.len(), 1);
    let (key, value) = &stored[0];
    assert!(key.ends_with(&tokens::hash(&token)));
    let text = String::from_utf8_lossy(value);
    assert!(!text.contains(&token) && !key.contains(&token));
    let (status, _) = api
        .put("/v1/services/user/instances/u1", Some(&token), reg())
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn dev_mode_needs_no_token_from_loopback() {
    let api = memory(true).await;
    let (status, _) = api.put("/v1/services/user/instances/u1", None, reg()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn ttl_registration_expires_unless_heartbeated() {
    ttl_expiry(&memory(true).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_registration_expires_unless_heartbeated_on_etcd() {
    let etcd = EtcdProcess::spawn().await;
    let store = EtcdStore::connect(EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    ttl_expiry(&start(Arc::new(store), true).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_answer_503_quickly_while_etcd_is_down() {
    let mut etcd = EtcdProcess::spawn().await;
    let store = EtcdStore::connect(EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    let api = start(Arc::new(store), false).await;
    let token = api.token_for("user").await;
    etcd.stop();
    for (path, body) in [
        ("/v1/services/user/instances/u1", reg()),
        ("/v1/services/user/instances/u1/heartbeat", Value::Null),
        ("/v1/services/user/config", json!({"mtls": "strict"})),
    ] {
        let started = tokio::time::Instant::now();
        let (status, answer) = api.put(path, Some(&token), body).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "store_unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path} took {:?}",
            started.elapsed()
        );
    }
    // Tokens are checked from memory: with etcd gone, a wrong token is
    // still a quick 401, not a 503 from a failed read.
    let started = tokio::time::Instant::now();
    let (status, answer) = api
        .put("/v1/services/user/instances/u1", Some("sp_guessed"), reg())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(1));
    let resp = api.http.get(api.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Reads keep answering from the last snapshot.
    let (status, _) = api.get("/v1/services").await;
    assert_eq!(status, StatusCode::OK);
}

async fn ttl_expiry(api: &Api) {
    let body = json!({"address": "10.0.0.5", "port": 8080, "ttl": "2s"});
    let (status, _) = api
        .put("/v1/services/x/instances/quiet", None, body.clone())
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api
        .put("/v1/services/x/instances/beating", None, body)
        .await;
    assert_eq!(status, StatusCode::OK);
    let started = tokio::time::Instant::now();
    let mut quiet_gone = None;
    while started.elapsed() < Duration::from_millis(3500) {
        let (status, _) = api
            .put(
                "/v1/services/x/instances/beating/heartbeat",
                None,
                Value::Null,
            )
            .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "heartbeat failed after {:?}",
            started.elapsed()
        );
        let (_, svc) = api.get("/v1/services/x").await;
        let ids: Vec<String> = svc["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        assert!(
            ids.contains(&"beating".to_string()),
            "heartbeated instance vanished"
        );
        if quiet_gone.is_none() && !ids.contains(&"quiet".to_string()) {
            quiet_gone = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let gone = quiet_gone.expect("the instance without heartbeat is still listed after 3.5 s");
    assert!(gone <= Duration::from_secs(3), "gone only after {gone:?}");
    let (status, answer) = api
        .put(
            "/v1/services/x/instances/quiet/heartbeat",
            None,
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
}

#[tokio::test]
async fn blocking_query_wakes_on_change() {
    let api = memory(true).await;
    let resp = api
        .http
        .get(api.url("/v1/services/user"))
        .send()
        .await
        .unwrap();
    let index: i64 = resp.headers()["x-signpost-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let url = api.url(&format!("/v1/services/user?index={index}&wait=10s"));
    let http = api.http.clone();
    let waiter = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
        (started.elapsed(), body)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the blocking query returned before any change"
    );
    let (status, _) = api.put("/v1/services/user/instances/u1", None, reg()).await;
    assert_eq!(status, StatusCode::OK);
    let (elapsed, body) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(elapsed < Duration::from_secs(5));
    assert_eq!(body["instances"][0]["id"], "u1");
    assert!(body["index"].as_i64().unwrap() > index);

    // A wait with nothing changing returns after the wait.
    let started = tokio::time::Instant::now();
    let index = body["index"].as_i64().unwrap();
    let (status, _) = api
        .get(&format!("/v1/services/user?index={index}&wait=300ms"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn service_config_round_trips() {
    let api = memory(true).await;
    let (status, answer) = api
        .put(
            "/v1/services/user/config",
            None,
            json!({"allow": ["order"], "mtls": "strict"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    eventually("config visible", Duration::from_secs(2), || async {
        let (_, svc) = api.get("/v1/services/user").await;
        svc["config"]["mtls"] == "strict" && svc["config"]["allow"][0] == "order"
    })
    .await;
    let (status, answer) = api
        .put(
            "/v1/services/user/config",
            None,
            json!({"mtls": "sometimes"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, _) = api
        .put(
            "/v1/services/user/config",
            None,
            json!({"allow": ["Bad_Name"]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn health_checks_mark_instances_critical_and_back() {
    let api = memory(true).await;
    // A TCP listener we control is the checked "app".
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        loop {
            if listener.accept().await.is_err() {
                break;
            }
        }
    });
    let body = json!({
        "address": "127.0.0.1", "port": addr.port(),
        "check": {"tcp": addr.to_string(), "interval": "1s", "timeout": "500ms"}
    });
    let (status, answer) = api.put("/v1/services/app/instances/a1", None, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    eventually("check passes", Duration::from_secs(5), || async {
        let (_, svc) = api.get("/v1/services/app").await;
        svc["instances"][0]["health"]["output"]
            .as_str()
            .is_some_and(|o| o.contains("ok"))
    })
    .await;
    accept.abort();
    let _ = accept.await;
    eventually(
        "two failures make it critical",
        Duration::from_secs(6),
        || async {
            let (_, svc) = api.get("/v1/services/app").await;
            svc["instances"][0]["health"]["status"] == "critical"
        },
    )
    .await;
    let (_, list) = api.get("/v1/services").await;
    assert_eq!(list["services"][0]["healthy"], 0);
    // Back up on the same port: one success makes it passing.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _accept = tokio::spawn(async move { while listener.accept().await.is_ok() {} });
    eventually(
        "one success makes it passing",
        Duration::from_secs(5),
        || async {
            let (_, svc) = api.get("/v1/services/app").await;
            svc["instances"][0]["health"]["status"] == "passing"
        },
    )
    .await;
}

#[tokio::test]
async fn health_endpoints_and_metrics() {
    let api = memory(true).await;
    let resp = api.http.get(api.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = api.http.get(api.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    api.put("/v1/services/user/instances/u1", None, reg()).await;
    let text = api.text("/metrics").await;
    assert!(text.contains("signpost_api_requests_total"), "{text}");
    assert!(text.contains("signpost_catalog_revision"), "{text}");
    let (status, answer) = api.get("/v1/nothing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(answer["error"]["code"], "not_found");
}

mod certificates {
    use super::*;
    use signpost_certs::{Ca, WorkloadKey, identity_from_cert};
    use signpost_control_plane::api::certs::CertAuthority;

    async fn with_ca() -> Api {
        let ca = CertAuthority {
            ca: Ca::generate_in_memory().unwrap(),
            zone: "xingren.host".into(),
            cert_ttl: Duration::from_secs(3600),
        };
        start_with_ca(Arc::new(MemoryStore::new()), false, Some(Arc::new(ca))).await
    }

    async fn post(api: &Api, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut req = api.http.post(api.url("/v1/certs")).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    fn identity_of(chain_pem: &str) -> String {
        let mut reader = chain_pem.as_bytes();
        let first = rustls_pemfile::certs(&mut reader).next().unwrap().unwrap();
        identity_from_cert(&first).unwrap().uri()
    }

    /// A CSR whose subject and SAN ask for another identity.
    fn csr_for(name: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec![format!("{name}.xingren.host")]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            format!("spiffe://xingren.host/svc/{name}")
                .try_into()
                .unwrap(),
        ));
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[tokio::test]
    async fn certificates_carry_the_token_identity() {
        let api = with_ca().await;
        let token = api.token_for("user").await;
        let csr = WorkloadKey::generate().unwrap().csr_pem().unwrap();

        let (status, body) = post(&api, Some(&token), json!({"csr": csr})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            identity_of(body["certificate"].as_str().unwrap()),
            "spiffe://xingren.host/svc/user"
        );
        assert!(body["expires"].as_str().is_some());

        // A CSR asking for another identity still gets the token's.
        let (status, body) = post(&api, Some(&token), json!({"csr": csr_for("admin")})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            identity_of(body["certificate"].as_str().unwrap()),
            "spiffe://xingren.host/svc/user"
        );

        let (status, body) =
            post(&api, Some(&token), json!({"csr": csr, "service": "order"})).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        let (status, body) = post(&api, None, json!({"csr": csr})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        let (status, body) = post(&api, Some(&token), json!({"csr": "not a csr"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["code"], "invalid_csr");

        // The admin names the service explicitly.
        let (status, body) = post(&api, Some(ADMIN), json!({"csr": csr, "service": "order"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            identity_of(body["certificate"].as_str().unwrap()),
            "spiffe://xingren.host/svc/order"
        );

        let roots = api.text("/v1/ca/roots").await;
        assert!(roots.starts_with("-----BEGIN CERTIFICATE-----"), "{roots}");
    }
}

/// Every error answer is `{"error": {"code", "message"}}`, including those
/// made outside the handlers.
#[tokio::test]
async fn every_error_is_json_with_a_code() {
    let api = memory(false).await;
    let before = api.stored().await;
    async fn check(resp: reqwest::Response, status: StatusCode, code: &str) -> String {
        assert_eq!(resp.status(), status);
        let text = resp.text().await.unwrap();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text:?}"));
        assert_eq!(body["error"]["code"], code, "{text}");
        let message = body["error"]["message"].as_str().unwrap().to_string();
        assert!(!message.is_empty(), "{text}");
        message
    }
    // 413 with a Content-Length past the limit (refused before the handler).
    let big = json!({"address": "10.0.0.1", "port": 80, "meta": {"k": "x".repeat(70 * 1024)}});
    let resp = api
        .http
        .put(api.url("/v1/services/user/instances/u1"))
        .bearer_auth(ADMIN)
        .json(&big)
        .send()
        .await
        .unwrap();
    let message = check(resp, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large").await;
    assert!(message.contains("65536"), "{message}");
    // 413 for a chunked body (no Content-Length), over a raw socket.
    let mut raw = format!(
        "PUT /v1/services/user/instances/u1 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    let chunk = format!(
        "{{\"address\": \"10.0.0.1\", \"port\": 80, \"meta\": {{\"k\": \"{}\"}}}}",
        "x".repeat(70 * 1024)
    );
    raw.extend(format!("{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len()).into_bytes());
    let answer = api.raw(&raw).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""code":"body_too_large""#), "{answer}");
    // 405.
    let resp = api.http.post(api.url("/v1/services")).send().await.unwrap();
    assert!(resp.headers().contains_key("allow"));
    let message = check(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    assert!(
        message.contains("POST") && message.contains("GET"),
        "{message}"
    );
    let resp = api
        .http
        .delete(api.url("/v1/services/user/config"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    check(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    // 431.
    let resp = api
        .http
        .get(api.url("/v1/services"))
        .header("x-padding", "p".repeat(20 * 1024))
        .send()
        .await
        .unwrap();
    check(
        resp,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
    )
    .await;
    // Bad blocking-query values.
    for (query, field) in [
        ("index=abc", "index"),
        ("index=-1", "index"),
        ("index=1.5", "index"),
        ("index=1&wait=forever", "wait"),
        ("wait=soon", "wait"),
    ] {
        let resp = api
            .http
            .get(api.url(&format!("/v1/services/user?{query}")))
            .send()
            .await
            .unwrap();
        let message = check(resp, StatusCode::BAD_REQUEST, "invalid_query").await;
        assert!(message.contains(field), "{query}: {message}");
    }
    // No JSON content type.
    let resp = api
        .http
        .put(api.url("/v1/services/user/instances/u1"))
        .bearer_auth(ADMIN)
        .body("address=10.0.0.1")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_client_error());
    let text = resp.text().await.unwrap();
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    assert!(body["error"]["code"].is_string(), "{text}");
    // Readiness while fine is a plain "ready"; the 404 of an unknown route is JSON.
    let resp = api.http.get(api.url("/v1/nothing")).send().await.unwrap();
    check(resp, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(
        api.stored().await,
        before,
        "a refused request changed the store"
    );
}

/// A check probes its own instance: other hosts, host names and URLs with a
/// password are refused (nothing stored) unless `--check-allow` covers them.
#[tokio::test]
async fn checks_must_target_their_own_instance() {
    let api = memory(false).await;
    let before = api.stored().await;
    let with_check = |check: Value| json!({"address": "10.0.0.5", "port": 8080, "check": check});
    for check in [
        json!({"tcp": "127.0.0.1:2379"}),
        json!({"tcp": "10.0.0.6:8080"}),
        json!({"tcp": "etcd.internal:2379"}),
        json!({"http": "http://169.254.169.254/latest/meta-data/"}),
        json!({"http": "http://10.0.0.9:8080/health"}),
        json!({"http": "http://admin:s3cret@10.0.0.5:8080/health"}),
        json!({"http": "http://localhost:8080/health"}),
    ] {
        let (status, answer) = api
            .put(
                "/v1/services/user/instances/u1",
                Some(ADMIN),
                with_check(check.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{check}: {answer}");
        assert_eq!(answer["error"]["code"], "check_target", "{check}: {answer}");
    }
    assert_eq!(
        api.stored().await,
        before,
        "a refused check changed the store"
    );

    // Its own address, a path, a port: taken and made absolute.
    for (check, target) in [
        (
            json!({"http": "/health"}),
            json!({"http": "http://10.0.0.5:8080/health"}),
        ),
        (
            json!({"http": "/ready", "port": 9000}),
            json!({"http": "http://10.0.0.5:9000/ready"}),
        ),
        (json!({"tcp": ":5432"}), json!({"tcp": "10.0.0.5:5432"})),
        (
            json!({"tcp": "10.0.0.5:8080"}),
            json!({"tcp": "10.0.0.5:8080"}),
        ),
        (
            json!({"http": "http://10.0.0.5:8080/h"}),
            json!({"http": "http://10.0.0.5:8080/h"}),
        ),
    ] {
        let (status, answer) = api
            .put(
                "/v1/services/user/instances/u1",
                Some(ADMIN),
                with_check(check.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{check}: {answer}");
        for (k, v) in target.as_object().unwrap() {
            assert_eq!(&answer["check"][k], v, "{check}: {answer}");
        }
    }

    // --check-allow 10.0.1.0/24: a check may probe there (not elsewhere, and
    // never with a password).
    let api = start_with(
        Arc::new(MemoryStore::new()),
        false,
        None,
        ApiPolicy {
            check_allow: vec!["10.0.1.0/24".parse().unwrap()],
            ..Default::default()
        },
    )
    .await;
    let (status, answer) = api
        .put(
            "/v1/services/user/instances/u1",
            Some(ADMIN),
            with_check(json!({"tcp": "10.0.1.7:80"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    for check in [
        json!({"tcp": "10.0.2.7:80"}),
        json!({"http": "http://u:p@10.0.1.7/"}),
    ] {
        let (status, answer) = api
            .put(
                "/v1/services/user/instances/u2",
                Some(ADMIN),
                with_check(check.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{check}: {answer}");
        assert_eq!(answer["error"]["code"], "check_target", "{check}: {answer}");
    }
}

impl Api {
    async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn create_token(&self, body: Value) -> (StatusCode, Value) {
        self.send(
            self.http
                .post(self.url("/v1/tokens"))
                .bearer_auth(ADMIN)
                .json(&body),
        )
        .await
    }

    async fn list_tokens(&self, token: &str) -> (StatusCode, Value) {
        self.send(self.http.get(self.url("/v1/tokens")).bearer_auth(token))
            .await
    }

    async fn revoke(&self, accessor: &str) -> StatusCode {
        self.send(
            self.http
                .delete(self.url(&format!("/v1/tokens/{accessor}")))
                .bearer_auth(ADMIN),
        )
        .await
        .0
    }
}

/// Tokens are listed by accessor (never the secret), revoked, and expire.
#[tokio::test]
async fn tokens_are_listed_revoked_and_expire() {
    let api = memory(false).await;
    let (status, plain) = api.create_token(json!({"service": "user"})).await;
    assert_eq!(status, StatusCode::CREATED, "{plain}");
    let (status, timed) = api
        .create_token(json!({"service": "order", "ttl": "720h"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{timed}");
    assert!(timed["expires"].is_string(), "{timed}");
    let secret = plain["token"].as_str().unwrap().to_string();
    let accessor = plain["accessor"].as_str().unwrap().to_string();
    assert!(!accessor.is_empty() && !secret.contains(&accessor));

    let (status, list) = api.list_tokens(ADMIN).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let rows = list["tokens"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(rows[0]["accessor"], accessor.as_str());
    assert_eq!(rows[0]["service"], "user");
    assert!(
        rows[0]["created"].is_string() && rows[0]["expires"].is_null(),
        "{list}"
    );
    assert_eq!(rows[1]["service"], "order");
    assert_eq!(rows[1]["expires"], timed["expires"]);
    let text = list.to_string();
    for secret in [secret.as_str(), timed["token"].as_str().unwrap()] {
        assert!(
            !text.contains(secret) && !text.contains(&tokens::hash(secret)),
            "{text}"
        );
    }
    // Only the admin lists and revokes.
    let (status, _) = api.list_tokens(&secret).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api
        .send(
            api.http
                .delete(api.url(&format!("/v1/tokens/{accessor}")))
                .bearer_auth(&secret),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Revoked: refused at once, gone from the list and the store.
    let (status, _) = api
        .put("/v1/services/user/instances/u1", Some(&secret), reg())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(api.revoke(&accessor).await, StatusCode::NO_CONTENT);
    let (status, answer) = api
        .put("/v1/services/user/instances/u1", Some(&secret), reg())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    let (_, list) = api.list_tokens(ADMIN).await;
    assert_eq!(list["tokens"].as_array().unwrap().len(), 1, "{list}");
    assert!(
        !api.stored()
            .await
            .iter()
            .any(|(k, _)| k.ends_with(&tokens::hash(&secret))),
        "the revoked token is still stored"
    );
    assert_eq!(api.revoke(&accessor).await, StatusCode::NOT_FOUND);

    // A bad ttl stores nothing.
    let before = api.stored().await;
    for ttl in ["10s", "forever", "100000h"] {
        let (status, answer) = api
            .create_token(json!({"service": "user", "ttl": ttl}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{ttl}: {answer}");
    }
    assert_eq!(api.stored().await, before);

    // Expiry: a token written to expire in 2 s works, then is refused.
    let token = tokens::generate();
    let record = json!({
        "service": "user",
        "created": "2026-01-01T00:00:00Z",
        "accessor": "0123456789abcdef",
        "expires": humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(2)).to_string(),
    });
    api.store
        .put(
            &Keys::default().token(&tokens::hash(&token)),
            serde_json::to_vec(&record).unwrap(),
            None,
        )
        .await
        .unwrap();
    eventually("the new token works", Duration::from_secs(2), || async {
        api.put("/v1/services/user/instances/u2", Some(&token), reg())
            .await
            .0
            == StatusCode::OK
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, answer) = api
        .put("/v1/services/user/instances/u2", Some(&token), reg())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{answer}"
    );

    // A record from before accessors still works and is listed.
    let old = tokens::generate();
    api.store
        .put(
            &Keys::default().token(&tokens::hash(&old)),
            serde_json::to_vec(&json!({"service": "pay", "created": "2025-01-01T00:00:00Z"}))
                .unwrap(),
            None,
        )
        .await
        .unwrap();
    eventually("the old token works", Duration::from_secs(2), || async {
        api.put("/v1/services/pay/instances/p1", Some(&old), reg())
            .await
            .0
            == StatusCode::OK
    })
    .await;
    let (_, list) = api.list_tokens(ADMIN).await;
    let row = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["service"] == "pay")
        .cloned()
        .unwrap();
    assert_eq!(row["accessor"].as_str().unwrap().len(), 16, "{row}");
    assert_eq!(
        api.revoke(row["accessor"].as_str().unwrap()).await,
        StatusCode::NO_CONTENT
    );
}

/// Failed authentications are limited per client IP: 429 with
/// `Retry-After` past the burst, then one a second again.
#[tokio::test]
async fn failed_authentication_is_rate_limited() {
    let api = memory(false).await;
    let token = api.token_for("user").await;
    for i in 0..10 {
        let (status, answer) = api
            .put(
                "/v1/services/user/instances/u1",
                Some(&format!("sp_guess{i}")),
                reg(),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "guess {i}: {answer}");
    }
    let resp = api
        .http
        .put(api.url("/v1/services/user/instances/u1"))
        .bearer_auth("sp_guess10")
        .json(&reg())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_failures", "{body}");
    // Even a good token waits: the guesser learns nothing meanwhile.
    let (status, _) = api
        .put("/v1/services/user/instances/u1", Some(&token), reg())
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Reads need no token and are not limited.
    let (status, _) = api.get("/v1/services").await;
    assert_eq!(status, StatusCode::OK);
    // After Retry-After, one more attempt.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let (status, _) = api
        .put("/v1/services/user/instances/u1", Some(&token), reg())
        .await;
    assert_eq!(status, StatusCode::OK);
}

/// A token revoked on one control plane is refused by another on the same
/// etcd within a second (through its watch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_everywhere_within_a_second() {
    let etcd = EtcdProcess::spawn().await;
    let connect = || async {
        Arc::new(
            EtcdStore::connect(EtcdOptions {
                endpoints: vec![etcd.endpoint()],
                ..EtcdOptions::default()
            })
            .await
            .unwrap(),
        )
    };
    let a = start(connect().await, false).await;
    let b = start(connect().await, false).await;
    let (status, made) = a.create_token(json!({"service": "user"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let token = made["token"].as_str().unwrap();
    eventually("B knows the token", Duration::from_secs(2), || async {
        b.put("/v1/services/user/instances/u1", Some(token), reg())
            .await
            .0
            == StatusCode::OK
    })
    .await;
    assert_eq!(
        a.revoke(made["accessor"].as_str().unwrap()).await,
        StatusCode::NO_CONTENT
    );
    let revoked = tokio::time::Instant::now();
    let mut refused = None;
    while revoked.elapsed() < Duration::from_secs(3) {
        if b.put("/v1/services/user/instances/u1", Some(token), reg())
            .await
            .0
            == StatusCode::UNAUTHORIZED
        {
            refused = Some(revoked.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = refused.expect("B still accepts the revoked token after 3 s");
    eprintln!("B refused the revoked token {refused:?} after A's revoke answered");
    assert!(refused < Duration::from_secs(1), "{refused:?}");
}

mod connections {
    use super::*;
    use signpost_control_plane::api::ConnectionLimits;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    async fn with_limits(limits: ConnectionLimits) -> Api {
        start_with(
            Arc::new(MemoryStore::new()),
            false,
            None,
            ApiPolicy {
                limits,
                ..Default::default()
            },
        )
        .await
    }

    fn addr(api: &Api) -> std::net::SocketAddr {
        api.base.trim_start_matches("http://").parse().unwrap()
    }

    /// A connection from `source` (a loopback address).
    async fn connect_from(api: &Api, source: &str) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(addr(api)).await.unwrap()
    }

    /// Sends one keep-alive request and reads its answer's head.
    async fn request(conn: &mut TcpStream) -> Result<String, std::io::Error> {
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await?;
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("no answer in 2 s"))??;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// How long until the server closes `conn` (reads until EOF).
    async fn closed_after(conn: &mut TcpStream, at_most: Duration) -> Option<Duration> {
        let started = tokio::time::Instant::now();
        let mut buf = vec![0u8; 1024];
        loop {
            match tokio::time::timeout_at(started + at_most, conn.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn partial_headers_and_idle_connections_are_closed_after_the_timeout() {
        let api = with_limits(ConnectionLimits {
            header_read_timeout: Duration::from_millis(500),
            ..Default::default()
        })
        .await;
        // Half a header, then nothing.
        let mut slow = TcpStream::connect(addr(&api)).await.unwrap();
        slow.write_all(b"GET /v1/services HTTP/1.1\r\nhost: x\r\nx-slow")
            .await
            .unwrap();
        let took = closed_after(&mut slow, Duration::from_secs(5))
            .await
            .expect("a partial header was held for 5 s");
        assert!(took >= Duration::from_millis(400), "closed after {took:?}");
        assert!(took < Duration::from_secs(2), "closed after {took:?}");
        // Trickling bytes does not reset it.
        let mut trickle = TcpStream::connect(addr(&api)).await.unwrap();
        let started = tokio::time::Instant::now();
        let mut closed = false;
        for _ in 0..40 {
            if trickle.write_all(b"x").await.is_err() {
                closed = true;
                break;
            }
            let mut buf = [0u8; 64];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(100), trickle.read(&mut buf)).await
            {
                closed = true;
                break;
            }
        }
        assert!(closed, "a trickled header was held for 4 s");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // An idle keep-alive connection is closed too.
        let mut idle = TcpStream::connect(addr(&api)).await.unwrap();
        let answer = request(&mut idle).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let took = closed_after(&mut idle, Duration::from_secs(5))
            .await
            .expect("an idle connection was held for 5 s");
        assert!(took < Duration::from_secs(2), "closed after {took:?}");
        // A blocking query outlives the header timeout: it has sent its
        // headers.
        let resp = api
            .http
            .get(api.url("/v1/services/user?index=999&wait=1500ms"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn connections_past_the_per_client_cap_are_closed() {
        let api = with_limits(ConnectionLimits {
            per_client: 5,
            ..Default::default()
        })
        .await;
        let mut held = Vec::new();
        for i in 0..5 {
            let mut conn = connect_from(&api, "127.0.0.1").await;
            let answer = request(&mut conn).await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{i}: {answer}");
            held.push(conn);
        }
        // The sixth from the same address is closed without an answer.
        let mut sixth = connect_from(&api, "127.0.0.1").await;
        // Closed: an empty read or a reset.
        if let Ok(answer) = request(&mut sixth).await {
            assert!(answer.is_empty(), "the sixth was served: {answer}");
        }
        // Another address has its own allowance.
        let mut other = connect_from(&api, "127.0.0.2").await;
        let answer = request(&mut other).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // Closing one makes room again.
        drop(held.pop());
        eventually("a slot is free again", Duration::from_secs(2), || async {
            let mut conn = connect_from(&api, "127.0.0.1").await;
            request(&mut conn)
                .await
                .is_ok_and(|a| a.starts_with("HTTP/1.1 200"))
        })
        .await;
        let mut conn = connect_from(&api, "127.0.0.2").await;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).await.unwrap();
        assert!(
            text.lines().any(|l| l
                .starts_with("signpost_api_connections_refused_total{limit=\"per_client\"}")
                && !l.ends_with(" 0")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn connections_past_the_total_cap_are_closed() {
        let api = with_limits(ConnectionLimits {
            total: 3,
            ..Default::default()
        })
        .await;
        let mut held = Vec::new();
        for (i, source) in ["127.0.0.1", "127.0.0.2", "127.0.0.3"].iter().enumerate() {
            let mut conn = connect_from(&api, source).await;
            let answer = request(&mut conn).await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{i}: {answer}");
            held.push(conn);
        }
        let mut fourth = connect_from(&api, "127.0.0.4").await;
        // Closed: an empty read or a reset.
        if let Ok(answer) = request(&mut fourth).await {
            assert!(answer.is_empty(), "the fourth was served: {answer}");
        }
    }
}

/// `--acl-read token`: catalog, config and metrics reads need a valid
/// token; the trust bundle and the probes stay open.
#[tokio::test]
async fn reads_need_a_token_with_acl_read_token() {
    let api = start_with(
        Arc::new(MemoryStore::new()),
        false,
        None,
        ApiPolicy {
            read_needs_token: true,
            ..Default::default()
        },
    )
    .await;
    let token = api.token_for("user").await;
    let (status, _) = api
        .put("/v1/services/user/instances/u1", Some(&token), reg())
        .await;
    assert_eq!(status, StatusCode::OK);
    let get = |path: &str, token: Option<&str>| {
        let mut req = api.http.get(api.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status();
            (status, resp.text().await.unwrap())
        }
    };
    for path in [
        "/v1/services",
        "/v1/services/user",
        "/v1/services/user?index=1&wait=10ms",
        "/v1/services/user/config",
        "/metrics",
    ] {
        let (status, body) = get(path, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        assert!(body.contains("\"unauthorized\""), "{path}: {body}");
        assert!(!body.contains("10.0.0.5"), "{path}: {body}");
        let (status, body) = get(path, Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let (status, _) = get(path, Some(ADMIN)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let (status, body) = get("/v1/services/user", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("10.0.0.5"), "{body}");
    let (status, _) = get("/v1/services", Some("sp_wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for path in ["/healthz", "/readyz"] {
        let (status, body) = get(path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    // No CA here: 503, but not 401.
    let (status, body) = get("/v1/ca/roots", None).await;
    assert_ne!(status, StatusCode::UNAUTHORIZED, "{body}");

    // The default stays open.
    let open = memory(false).await;
    let (status, _) = open.get("/v1/services").await;
    assert_eq!(status, StatusCode::OK);
}
