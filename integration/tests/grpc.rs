//! gRPC and HTTP/2 through the mesh, end to end: `grpc-echo` apps behind
//! `signpost sidecar`s, called by this test process through a caller
//! sidecar's outbound port, the way an app behind its sidecar calls.
//!
//! Every test has its own mesh and its own hosts on 127.0.71.x, so the tests
//! run side by side.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::SinkExt;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use signpost_examples::grpc::{
    EchoClient, EchoRequest, INSTANCE_TRAILER, MAX_STREAM_PAYLOAD, StreamRequest, echo_client,
};
use signpost_integration::mesh::{Mesh, MeshOptions, Pod, args};
use signpost_integration::{Process, dig_short, eventually, workspace_bin};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// The third octet of every address here.
const NET: u8 = 71;

/// The name the caller calls echo by.
const ECHO: &str = "echo.xingren.host";

/// A bound on any one step that should take milliseconds, so a hang fails
/// the test with a message instead of stalling it.
const STEP: Duration = Duration::from_secs(10);

/// Where one test's pods live: the last octets of its two echo instances
/// (e1, e2) and of the caller's sidecar.
struct Hosts {
    echo: [u8; 2],
    caller: u8,
}

/// Two echo instances, e1 and e2, each behind a sidecar for `echo`, and a
/// sidecar for `client` whose app is this test process.
struct EchoMesh {
    mesh: Mesh,
    caller: u8,
    _echo: Vec<Pod>,
    _caller: Process,
}

impl EchoMesh {
    /// The caller sidecar's outbound address, where this test's calls go.
    fn outbound(&self) -> SocketAddr {
        self.mesh.outbound(self.caller)
    }

    /// An Echo client on one new HTTP/2 connection to the caller's sidecar,
    /// calling `authority`.
    async fn client(&self, authority: &str) -> EchoClient<Channel> {
        echo_client(self.outbound(), authority)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.outbound()))
    }
}

/// A mesh with tokens for `echo`, `client` and `user`.
async fn mesh() -> Mesh {
    Mesh::start_with(
        NET,
        MeshOptions {
            services: vec!["echo".into(), "client".into(), "user".into()],
            ..MeshOptions::default()
        },
    )
    .await
}

/// Starts the sidecar for `client` on `host`: its app is an address nobody
/// listens on, since the app is this test process.
async fn caller_sidecar(mesh: &Mesh, host: u8) -> Process {
    let unused_app = format!("{}:9999", mesh.ip(host));
    mesh.sidecar("client", "c1", host, &unused_app, &[]).await
}

/// Waits until `service` has `n` instances in Signpost DNS, which is what
/// the caller's sidecar resolves on its first call.
async fn wait_registered(mesh: &Mesh, service: &str, n: usize) {
    let name = format!("{service}.xingren.host");
    eventually(
        &format!("{n} instances of {service} in DNS"),
        Duration::from_secs(15),
        || async { dig_short(mesh.dns, &name, "SRV", false).len() == n },
    )
    .await;
}

/// Waits until something accepts TCP connections at `addr`.
async fn wait_listening(addr: &str) {
    eventually(
        &format!("{addr} accepts connections"),
        Duration::from_secs(10),
        || async { tokio::net::TcpStream::connect(addr).await.is_ok() },
    )
    .await;
}

/// Starts grpc-echo as instance `id` on `host`, port 9090; returns it and
/// its address once it listens.
async fn echo_app(mesh: &Mesh, id: &str, host: u8) -> (Process, String) {
    let listen = format!("{}:9090", mesh.ip(host));
    let app = Process::spawn(
        &format!("{id}-app"),
        &workspace_bin("grpc-echo"),
        &args(&["--listen", &listen, "--id", id]),
        mesh.dir.path(),
    );
    wait_listening(&listen).await;
    (app, listen)
}

/// The topology every gRPC test uses, on `hosts`.
async fn echo_mesh(hosts: Hosts) -> EchoMesh {
    let mesh = mesh().await;
    let [h1, h2] = hosts.echo;
    let (app1, listen1) = echo_app(&mesh, "e1", h1).await;
    let (app2, listen2) = echo_app(&mesh, "e2", h2).await;
    let (sidecar1, sidecar2, caller) = tokio::join!(
        mesh.sidecar("echo", "e1", h1, &listen1, &[]),
        mesh.sidecar("echo", "e2", h2, &listen2, &[]),
        caller_sidecar(&mesh, hosts.caller),
    );
    wait_registered(&mesh, "echo", 2).await;
    let echo = vec![
        Pod {
            host: h1,
            app: app1,
            sidecar: sidecar1,
        },
        Pod {
            host: h2,
            app: app2,
            sidecar: sidecar2,
        },
    ];
    EchoMesh {
        mesh,
        caller: hosts.caller,
        _echo: echo,
        _caller: caller,
    }
}

/// A plain unary request.
fn unary(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..EchoRequest::default()
    }
}

/// The value of the sample `series` (name and labels, exactly) in
/// Prometheus text, if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    })
}

/// A metadata value as text, for assertions.
fn meta(status: &Status, key: &str) -> Option<String> {
    status
        .metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

/// Forty unary calls in flight together on `client`'s one channel, each
/// holding 100 ms so the balancer sees the load it put on each instance;
/// how many each instance served.
async fn forty_calls_together(client: EchoClient<Channel>) -> BTreeMap<String, usize> {
    let calls = (0..40).map(|i| {
        let mut client = client.clone();
        async move {
            let request = EchoRequest {
                message: format!("call {i}"),
                sleep_ms: 100,
                ..EchoRequest::default()
            };
            tokio::time::timeout(STEP, client.unary(request)).await
        }
    });
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for (i, answer) in futures::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        let reply = answer
            .unwrap_or_else(|_| panic!("call {i} got no answer in {STEP:?}"))
            .unwrap_or_else(|status| panic!("call {i} failed: {status:?}"))
            .into_inner();
        assert_eq!(reply.message, format!("call {i}"));
        assert!(
            reply.authority.contains("echo"),
            "the app saw :authority {:?}, not the echo service's name",
            reply.authority
        );
        *served.entry(reply.instance).or_default() += 1;
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_balanced_per_call_on_one_channel() {
    let m = echo_mesh(Hosts {
        echo: [11, 12],
        caller: 21,
    })
    .await;
    // One channel is one HTTP/2 connection: a sidecar that balanced per
    // connection would send all of these to one instance. The calls are in
    // flight together (each holds 100 ms), so the balancer sees the load it
    // put on each instance.
    let served = forty_calls_together(m.client(ECHO).await).await;
    assert_eq!(
        served.keys().map(String::as_str).collect::<Vec<_>>(),
        ["e1", "e2"],
        "40 calls on one channel were served as {served:?}"
    );

    let series =
        r#"signpost_sidecar_requests_total{direction="outbound",service="echo",status="200"}"#;
    // The HTTP status says 200 whatever happened; the gRPC status is its own.
    let ok = r#"signpost_sidecar_grpc_responses_total{direction="outbound",service="echo",grpc_status="0"}"#;
    let last = std::sync::Mutex::new(String::new());
    let counted = signpost_control_plane::testing::eventually(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async {
            let metrics = m.mesh.metrics_of(m.caller).await;
            let enough = sample(&metrics, series).is_some_and(|n| n >= 40.0)
                && sample(&metrics, ok).is_some_and(|n| n >= 40.0);
            *last.lock().expect("not poisoned") = metrics;
            enough
        },
    )
    .await;
    assert!(
        counted,
        "{series} or {ok} is not at least 40 in\n{}",
        last.lock().expect("not poisoned")
    );
}

/// A channel to `authority` the way a gRPC client with `http_proxy` set
/// makes one: `CONNECT authority:80` to the caller's outbound, then
/// HTTP/2 inside the tunnel.
async fn channel_through_connect(outbound: SocketAddr, authority: &str) -> Channel {
    let target = authority.to_string();
    let connector = tower::service_fn(move |_: http::Uri| {
        let target = target.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(outbound).await?;
            let connect = format!("CONNECT {target}:80 HTTP/1.1\r\nhost: {target}:80\r\n\r\n");
            stream.write_all(connect.as_bytes()).await?;
            // The answer's head, byte by byte: nothing after it may be
            // read here, it belongs to HTTP/2.
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                if stream.read(&mut byte).await? == 0 {
                    return Err(std::io::Error::other("closed during CONNECT"));
                }
                head.push(byte[0]);
            }
            if !head.starts_with(b"HTTP/1.1 200") {
                return Err(std::io::Error::other(
                    String::from_utf8_lossy(&head).into_owned(),
                ));
            }
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_http_proxy_connect_is_balanced_per_call() {
    let m = echo_mesh(Hosts {
        echo: [91, 92],
        caller: 101,
    })
    .await;
    let channel = channel_through_connect(m.outbound(), ECHO).await;
    let served = forty_calls_together(EchoClient::new(channel)).await;
    assert_eq!(
        served.keys().map(String::as_str).collect::<Vec<_>>(),
        ["e1", "e2"],
        "40 calls in one CONNECT tunnel were served as {served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_trailers_and_large_messages_cross_the_mesh() {
    let m = echo_mesh(Hosts {
        echo: [31, 32],
        caller: 41,
    })
    .await;
    let mut client = m.client(ECHO).await;
    let instances = ["e1", "e2"];

    // Server stream: 100 replies of 64 KiB, 6.4 MiB in all, far past any
    // HTTP/2 window, so it only arrives if flow control works on each hop.
    let size = 64 * 1024;
    let mut replies = tokio::time::timeout(
        STEP,
        client.server_stream(StreamRequest { count: 100, size }),
    )
    .await
    .expect("server stream headers in time")
    .expect("server stream starts")
    .into_inner();
    let mut n = 0u32;
    while let Some(reply) = tokio::time::timeout(STEP, replies.message())
        .await
        .expect("the next streamed reply in time")
        .expect("a streamed reply")
    {
        n += 1;
        assert_eq!(reply.message, n.to_string(), "replies out of order");
        assert_eq!(reply.payload.len(), size as usize, "reply {n} cut short");
    }
    assert_eq!(n, 100, "the stream ended early");
    let trailers = tokio::time::timeout(STEP, replies.trailers())
        .await
        .expect("trailers in time")
        .expect("the stream ends cleanly")
        .expect("the stream has trailers");
    let instance = trailers
        .get(INSTANCE_TRAILER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        instances.contains(&instance),
        "server stream trailer {INSTANCE_TRAILER} is {instance:?}; trailers: {trailers:?}"
    );

    // Client stream: 100 requests of 16 KiB, totalled by the server.
    let requests = (0..100).map(|i| EchoRequest {
        message: i.to_string(),
        payload: Bytes::from(vec![7u8; 16 * 1024]),
        ..EchoRequest::default()
    });
    let total = tokio::time::timeout(STEP, client.client_stream(futures::stream::iter(requests)))
        .await
        .expect("client stream answered in time")
        .expect("client stream succeeds")
        .into_inner();
    assert_eq!(total.received_messages, 100);
    assert_eq!(total.received_bytes, 100 * 16 * 1024);
    assert_eq!(total.message, "99", "the last request is not the last seen");

    // Bidi: each request is sent only after the previous one's echo came
    // back; a hop that held requests or replies back until more arrived
    // would deadlock here.
    let (mut tx, rx) = futures::channel::mpsc::channel::<EchoRequest>(1);
    tx.send(unary("round 0")).await.expect("queue round 0");
    let mut echoes = tokio::time::timeout(STEP, client.bidi(rx))
        .await
        .expect("bidi headers in time")
        .expect("bidi starts")
        .into_inner();
    for round in 0..10 {
        if round > 0 {
            tx.send(unary(&format!("round {round}")))
                .await
                .expect("send the next round");
        }
        let echo = tokio::time::timeout(STEP, echoes.message())
            .await
            .unwrap_or_else(|_| panic!("round {round} was not echoed in {STEP:?}"))
            .expect("a bidi reply")
            .expect("the stream still open");
        assert_eq!(echo.message, format!("round {round}"));
        assert_eq!(echo.received_messages, round + 1);
    }
    drop(tx);
    let end = tokio::time::timeout(STEP, echoes.message())
        .await
        .expect("bidi ends in time")
        .expect("bidi ends cleanly");
    assert!(end.is_none(), "an echo after the last request: {end:?}");

    // Unary of 1 MiB (the largest payload the server streams; a unary
    // request may be larger, under tonic's 4 MiB): every byte intact.
    let payload: Bytes = (0..MAX_STREAM_PAYLOAD).map(|i| (i % 251) as u8).collect();
    let reply = tokio::time::timeout(
        STEP,
        client.unary(EchoRequest {
            message: "big".into(),
            payload: payload.clone(),
            ..EchoRequest::default()
        }),
    )
    .await
    .expect("1 MiB unary answered in time")
    .expect("1 MiB unary succeeds")
    .into_inner();
    assert_eq!(reply.received_bytes, u64::from(MAX_STREAM_PAYLOAD));
    assert!(
        reply.payload == payload,
        "the 1 MiB payload came back changed"
    );
}

/// One gRPC message frame: a zero (uncompressed) flag, the length big
/// endian, the message.
fn grpc_frame(message: &impl prost::Message) -> Bytes {
    let encoded = message.encode_to_vec();
    let len = u32::try_from(encoded.len()).expect("a message under 4 GiB");
    let mut frame = Vec::with_capacity(5 + encoded.len());
    frame.push(0);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&encoded);
    frame.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_and_deadlines_are_grpc_statuses() {
    let m = echo_mesh(Hosts {
        echo: [51, 52],
        caller: 61,
    })
    .await;
    let mut client = m.client(ECHO).await;

    // The app's own status passes through untouched.
    let status = client
        .unary(EchoRequest {
            fail_code: 5,
            ..EchoRequest::default()
        })
        .await
        .expect_err("fail_code 5 fails");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "failing as asked (fail_code 5)");
    assert!(
        meta(&status, INSTANCE_TRAILER).is_some(),
        "the app's status lost its {INSTANCE_TRAILER}: {status:?}"
    );
    assert_eq!(meta(&status, "x-signpost-error"), None, "{status:?}");

    // A service nobody runs: UNAVAILABLE from the mesh.
    let mut nosuch = m.client("nosuch.xingren.host").await;
    let status = tokio::time::timeout(STEP, nosuch.unary(unary("anyone?")))
        .await
        .expect("an answer for nosuch in time")
        .expect_err("nosuch has no instances");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("no healthy instance"),
        "{status:?}"
    );
    assert!(
        meta(&status, "x-signpost-error").is_some(),
        "no x-signpost-error on {status:?}"
    );

    // A client's deadline crosses the mesh to the app.
    let mut request = Request::new(unary("with a deadline"));
    request.set_timeout(Duration::from_secs(5));
    let reply = client
        .unary(request)
        .await
        .expect("a call within its deadline")
        .into_inner();
    assert!(
        (1..=5000).contains(&reply.timeout_ms),
        "the app saw a deadline of {} ms for a 5 s one",
        reply.timeout_ms
    );

    // The sidecar enforces `grpc-timeout` itself: a raw HTTP/2 call whose
    // client never gives up is answered DEADLINE_EXCEEDED, trailers-only,
    // long before the app's 3 s sleep ends.
    let tcp = tokio::net::TcpStream::connect(m.outbound())
        .await
        .expect("connect to the outbound port");
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("an h2c (prior knowledge) handshake with the outbound port");
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://{ECHO}/signpost.echo.v1.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(Full::new(grpc_frame(&EchoRequest {
            sleep_ms: 3000,
            ..EchoRequest::default()
        })))
        .expect("a request");
    let started = Instant::now();
    let response = tokio::time::timeout(STEP, h2.send_request(request))
        .await
        .expect("an answer in time")
        .expect("an HTTP/2 response");
    let elapsed = started.elapsed();
    let (head, body) = response.into_parts();
    assert_eq!(head.status, http::StatusCode::OK, "{head:?}");
    assert_eq!(
        head.headers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"4"[..]),
        "not a trailers-only DEADLINE_EXCEEDED: {head:?}"
    );
    assert!(
        head.headers.contains_key("x-signpost-error"),
        "no x-signpost-error: {head:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "DEADLINE_EXCEEDED after {elapsed:?}, not at the 300 ms deadline"
    );
    let rest = tokio::time::timeout(STEP, body.collect())
        .await
        .expect("the body ends in time")
        .expect("the body ends cleanly")
        .to_bytes();
    assert!(
        rest.is_empty(),
        "a trailers-only answer had a body: {rest:?}"
    );

    // The same through tonic. tonic's own timer races the sidecar's and
    // reports its expiry as CANCELLED; either way the call ends at the
    // deadline, not when the app answers.
    let mut request = Request::new(EchoRequest {
        sleep_ms: 3000,
        ..EchoRequest::default()
    });
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let status = client
        .unary(request)
        .await
        .expect_err("a 3 s call with a 300 ms deadline fails");
    let elapsed = started.elapsed();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(elapsed < Duration::from_secs(2), "ended after {elapsed:?}");

    // The allow-list: once echo allows only billing, client is refused.
    m.mesh
        .put_config("echo", json!({"allow": ["billing"]}))
        .await;
    let last = std::sync::Mutex::new(None);
    let refused = signpost_control_plane::testing::eventually(
        Duration::from_secs(15),
        Duration::from_millis(100),
        || {
            let (mut client, last) = (client.clone(), &last);
            async move {
                let answer = tokio::time::timeout(STEP, client.unary(unary("allowed?"))).await;
                let refused = matches!(&answer, Ok(Err(s)) if s.code() == Code::PermissionDenied);
                *last.lock().expect("not poisoned") = Some(answer);
                refused
            }
        },
    )
    .await;
    let last = last.into_inner().expect("not poisoned");
    assert!(refused, "never PERMISSION_DENIED; last answer {last:?}");
    let Some(Ok(Err(status))) = last else {
        unreachable!("refused means a status")
    };
    assert!(
        status.message().contains("client") || status.message().contains("allow"),
        "PERMISSION_DENIED names neither the caller nor the allow-list: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http2_prior_knowledge_reaches_an_http1_app() {
    let mesh = mesh().await;
    let (user_host, caller_host) = (73, 81);
    let listen = format!("{}:8080", mesh.ip(user_host));
    let _app = Process::spawn(
        "u1-app",
        &workspace_bin("user"),
        &args(&["--listen", &listen, "--id", "u1"]),
        mesh.dir.path(),
    );
    wait_listening(&listen).await;
    let extra = args(&["--app-protocol", "http1", "--app-health", "/health"]);
    let (_user, _caller) = tokio::join!(
        mesh.sidecar("user", "u1", user_host, &listen, &extra),
        caller_sidecar(&mesh, caller_host),
    );
    wait_registered(&mesh, "user", 1).await;

    let url = format!("http://{}/users/1", mesh.outbound(caller_host));
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "10", "--http2-prior-knowledge"])
        .args(["-H", "host: user.xingren.host"])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .arg(&url)
        .output()
        .await
        .expect("run curl (apt-get install curl)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl failed: {out:?}");
    let (body, status_line) = stdout
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no status line from curl: {stdout:?}"));
    assert_eq!(
        status_line, "200 2",
        "curl's status and HTTP version; body {body}"
    );
    let user: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(user["id"], 1, "{user}");
    assert_eq!(user["served_by"], "u1", "{user}");
    assert_eq!(
        user["caller"], "client",
        "the app did not see the mesh caller: {user}"
    );
}

#[test]
fn sample_reads_exactly_the_named_series() {
    let text = "a_total{x=\"1\"} 3\na_total{x=\"10\"} 5\n";
    assert_eq!(sample(text, "a_total{x=\"1\"}"), Some(3.0));
    assert_eq!(sample(text, "a_total{x=\"10\"}"), Some(5.0));
    assert_eq!(sample(text, "a_total{x=\"2\"}"), None);
    assert_eq!(sample(text, "a_total"), None);
}
