//! Connections that stop being HTTP, end to end: WebSockets (HTTP/1.1
//! Upgrade) across the mesh over mTLS, and `CONNECT` tunnels, both out of
//! the mesh (`https_proxy` egress) and to mesh names (mesh HTTP inside the
//! tunnel, or opaque TLS carried to the service's app).
//!
//! The apps on either end are this test process: a WebSocket echo server,
//! a TLS server with a self-signed certificate, a plain HTTP server, and
//! clients that speak through a caller sidecar's outbound port. Every test
//! has its own mesh on 127.0.72.x, with hosts of its own so the tests run
//! side by side.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{Value, json};
use signpost_integration::eventually;
use signpost_integration::mesh::{Mesh, MeshOptions, args};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The third octet of every address in this file.
const NET: u8 = 72;

/// Waits for `fut`, failing the test with `what` after `limit`.
async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// A mesh with tokens for every service used here.
async fn mesh() -> Mesh {
    Mesh::start_with(
        NET,
        MeshOptions {
            services: vec!["ws".into(), "tls".into(), "user".into(), "client".into()],
            ..MeshOptions::default()
        },
    )
    .await
}

/// The `--app` of a caller sidecar: the test process makes calls but serves
/// none, so nothing listens there.
fn no_app(mesh: &Mesh, host: u8) -> String {
    format!("{}:9999", mesh.ip(host))
}

/// The value of the metric line that starts with `series` (name and
/// labels), 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// The WebSocket app.

/// What the WebSocket app reports of one connection.
#[derive(Debug, PartialEq)]
enum Seen {
    /// The handshake arrived, with this `x-signpost-caller`.
    Handshake { caller: Option<String> },
    /// The connection's stream ended; whether a Close frame came first.
    Ended { close_received: bool },
}

/// Starts the WebSocket app on `addr`. On every connection it sends
/// "hello", then on `/bye` closes with reason "bye", and on any other path
/// echoes every text and binary message until the client closes.
async fn websocket_app(addr: &str) -> mpsc::UnboundedReceiver<Seen> {
    let listener = TcpListener::bind(addr).await.expect("bind the ws app");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(websocket_connection(stream, tx.clone()));
        }
    });
    rx
}

// The handshake callback's error type is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
async fn websocket_connection(stream: TcpStream, seen: mpsc::UnboundedSender<Seen>) {
    let mut caller = None;
    let mut path = String::new();
    let handshake =
        tokio_tungstenite::accept_hdr_async(stream, |req: &WsRequest, rsp: WsResponse| {
            caller = req
                .headers()
                .get("x-signpost-caller")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            path = req.uri().path().to_string();
            Ok(rsp)
        });
    let Ok(mut ws) = handshake.await else {
        return;
    };
    let _ = seen.send(Seen::Handshake { caller });
    if ws.send(Message::text("hello")).await.is_err() {
        return;
    }
    if path == "/bye" {
        let _ = ws
            .close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
    let mut close_received = false;
    while let Some(Ok(msg)) = ws.next().await {
        let echo = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(_) => {
                close_received = true;
                continue;
            }
            _ => continue,
        };
        if ws.send(echo).await.is_err() {
            break;
        }
    }
    let _ = seen.send(Seen::Ended { close_received });
}

type Ws = WebSocketStream<TcpStream>;

/// One WebSocket handshake to service `ws` through the outbound `proxy`.
async fn ws_handshake(proxy: SocketAddr, path: &str) -> Result<Ws, WsError> {
    let stream = TcpStream::connect(proxy).await?;
    let (ws, _) =
        tokio_tungstenite::client_async(format!("ws://ws.xingren.host{path}"), stream).await?;
    Ok(ws)
}

/// A WebSocket to service `ws` through `proxy`, retrying until the caller
/// sidecar knows an instance (bounded).
async fn open_ws(proxy: SocketAddr, path: &str) -> Ws {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let err =
            match tokio::time::timeout(Duration::from_secs(5), ws_handshake(proxy, path)).await {
                Ok(Ok(ws)) => return ws,
                Ok(Err(err)) => err.to_string(),
                Err(_) => "the handshake took over 5 s".to_string(),
            };
        assert!(
            Instant::now() < deadline,
            "no websocket through {proxy} to ws{path}: {err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next message, within a bound.
async fn next_msg(ws: &mut Ws) -> Message {
    within(
        "the next websocket message",
        Duration::from_secs(10),
        ws.next(),
    )
    .await
    .expect("the websocket ended")
    .expect("the websocket failed")
}

/// Sends `msg` and asserts it comes back unchanged.
async fn echoes(ws: &mut Ws, msg: Message) {
    within(
        "sending a message",
        Duration::from_secs(10),
        ws.send(msg.clone()),
    )
    .await
    .expect("send");
    let back = next_msg(ws).await;
    assert!(back == msg, "sent {} bytes, got back {back:?}", msg.len());
}

/// The app's next report, within a bound.
async fn next_seen(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    within(
        "a report from the ws app",
        Duration::from_secs(10),
        seen.recv(),
    )
    .await
    .expect("the ws app stopped reporting")
}

// ---------------------------------------------------------------------------
// TLS and plain HTTP apps.

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed identity for `localhost` and the TLS apps' addresses: the
/// acceptor that presents it, and a connector that trusts only it.
fn tls_pair() -> (TlsAcceptor, TlsConnector) {
    let issued = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "127.0.72.30".to_string(),
        "127.0.72.114".to_string(),
    ])
    .expect("a self-signed certificate");
    let cert = issued.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.signing_key.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("trust the certificate");
    let client = rustls::ClientConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        TlsAcceptor::from(Arc::new(server)),
        TlsConnector::from(Arc::new(client)),
    )
}

/// Reads one request head from `io` and answers `body` with
/// `Connection: close`.
async fn answer_once<I: AsyncRead + AsyncWrite + Unpin>(mut io: I, body: &str) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let rsp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = io.write_all(rsp.as_bytes()).await;
    let _ = io.shutdown().await;
}

/// Starts a TLS server on `addr` answering "hello over tls" to each
/// connection; counts the connections it answered.
async fn tls_app(addr: &str, acceptor: TlsAcceptor) -> Arc<AtomicUsize> {
    let listener = TcpListener::bind(addr).await.expect("bind the tls app");
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(Duration::from_secs(5), acceptor.accept(stream));
                if let Ok(Ok(tls)) = handshake.await {
                    answer_once(tls, "hello over tls").await;
                    count.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    served
}

/// Starts a plain HTTP server on `listener` answering "hello over http".
fn http_app(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer_once(stream, "hello over http"));
        }
    });
}

/// Sends `CONNECT authority` to the outbound `proxy` and returns the
/// stream and the response head, read to its end and not a byte further
/// (what follows belongs to the tunnel).
async fn connect(proxy: SocketAddr, authority: &str) -> (TcpStream, String) {
    let mut stream = within(
        "connecting to the outbound",
        Duration::from_secs(5),
        TcpStream::connect(proxy),
    )
    .await
    .expect("connect to the outbound");
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .expect("send CONNECT");
    let mut head = Vec::new();
    let read_head = async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    };
    within(
        "the CONNECT response head",
        Duration::from_secs(10),
        read_head,
    )
    .await;
    (stream, String::from_utf8_lossy(&head).into_owned())
}

/// The status code of a response head.
fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a response head: {head:?}"))
}

/// Whether a response head has header `name`.
fn has_header(head: &str, name: &str) -> bool {
    head.lines().skip(1).any(|l| {
        l.split(':')
            .next()
            .is_some_and(|n| n.trim().eq_ignore_ascii_case(name))
    })
}

/// Sends one plain `GET /` with `Connection: close` on `io` and returns all
/// that comes back.
async fn get_over<I: AsyncRead + AsyncWrite + Unpin>(mut io: I, host: &str) -> String {
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    io.write_all(req.as_bytes())
        .await
        .expect("send the request");
    let mut rsp = Vec::new();
    let _ = within(
        "the tunnelled response",
        Duration::from_secs(10),
        io.read_to_end(&mut rsp),
    )
    .await;
    String::from_utf8_lossy(&rsp).into_owned()
}

/// A plain HTTP client whose every call goes through the outbound `proxy`.
fn via(proxy: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{proxy}")).expect("a proxy URL"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client")
}

// ---------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_crosses_the_mesh_both_ways_and_closes() {
    let mesh = mesh().await;
    let app = format!("{}:8080", mesh.ip(11));
    let mut seen = websocket_app(&app).await;
    // Request and body timers far shorter than the idle pause below: an
    // upgraded connection must not be subject to them.
    let timers = args(&["--request-timeout", "1s", "--body-idle-timeout", "1s"]);
    let _ws_sidecar = mesh.sidecar("ws", "w1", 11, &app, &timers).await;
    let _caller = mesh
        .sidecar("client", "c1", 21, &no_app(&mesh, 21), &timers)
        .await;

    let mut ws = open_ws(mesh.outbound(21), "/chat").await;
    assert_eq!(
        next_seen(&mut seen).await,
        Seen::Handshake {
            caller: Some("client".into())
        },
        "the app sees who calls"
    );
    // Server → client.
    assert_eq!(next_msg(&mut ws).await, Message::text("hello"));
    // Client → server → client.
    for i in 0..5 {
        echoes(&mut ws, Message::text(format!("message {i}"))).await;
    }
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    echoes(&mut ws, Message::binary(big)).await;

    // Quiet for longer than every request timer of both sidecars.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    echoes(&mut ws, Message::text("after a quiet while")).await;

    // The client closes: the app sees the Close and its stream ends, and
    // the client gets the closing handshake back and its stream ends.
    within("sending Close", Duration::from_secs(5), ws.close(None))
        .await
        .expect("send Close");
    let client_end = within(
        "the client's stream to end",
        Duration::from_secs(10),
        async { while let Some(Ok(_)) = ws.next().await {} },
    );
    client_end.await;
    assert_eq!(
        next_seen(&mut seen).await,
        Seen::Ended {
            close_received: true
        },
        "the client's Close reaches the app"
    );

    // The app closes first: the client sees its Close frame, reason and
    // all, then the end of the stream.
    let mut ws = open_ws(mesh.outbound(21), "/bye").await;
    assert!(matches!(next_seen(&mut seen).await, Seen::Handshake { .. }));
    assert_eq!(next_msg(&mut ws).await, Message::text("hello"));
    match next_msg(&mut ws).await {
        Message::Close(Some(frame)) => {
            assert_eq!(frame.code, CloseCode::Normal);
            assert_eq!(frame.reason.as_str(), "bye");
        }
        other => panic!("expected the app's Close, got {other:?}"),
    }
    let rest = within(
        "the client's stream to end",
        Duration::from_secs(10),
        ws.next(),
    )
    .await;
    assert!(
        !matches!(rest, Some(Ok(_))),
        "a message after Close: {rest:?}"
    );
    assert_eq!(
        next_seen(&mut seen).await,
        Seen::Ended {
            close_received: true
        },
        "the client's answering Close reaches the app"
    );

    // Both handshakes counted as what they were: 101.
    let m = mesh.metrics_of(21).await;
    let switched = metric(
        &m,
        "signpost_sidecar_requests_total{direction=\"outbound\",service=\"ws\",status=\"101\"}",
    );
    assert_eq!(switched, 2.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_follows_the_allow_list_and_drains_on_sigterm() {
    let mesh = mesh().await;
    let app = format!("{}:8080", mesh.ip(41));
    let mut seen = websocket_app(&app).await;
    let _ws_sidecar = mesh.sidecar("ws", "w1", 41, &app, &[]).await;
    let mut caller = mesh
        .sidecar("client", "c1", 51, &no_app(&mesh, 51), &[])
        .await;

    let mut ws = open_ws(mesh.outbound(51), "/chat").await;
    assert!(matches!(next_seen(&mut seen).await, Seen::Handshake { .. }));
    assert_eq!(next_msg(&mut ws).await, Message::text("hello"));
    echoes(&mut ws, Message::text("before the signal")).await;

    // SIGTERM to the caller's sidecar: it lingers (1 s), stops accepting,
    // drains (5 s), then cuts what is still open and exits 0.
    let signalled = Instant::now();
    let exit = tokio::task::spawn_blocking(move || caller.terminate(Duration::from_secs(20)));
    echoes(&mut ws, Message::text("right after the signal")).await;
    let outbound = mesh.outbound(51);
    eventually(
        "the stopping sidecar refuses new connections",
        Duration::from_secs(10),
        || async move { TcpStream::connect(outbound).await.is_err() },
    )
    .await;
    echoes(&mut ws, Message::text("while draining")).await;
    let end = within(
        "the drained websocket to be closed",
        Duration::from_secs(15),
        ws.next(),
    )
    .await;
    let cut_after = signalled.elapsed();
    assert!(
        !matches!(end, Some(Ok(_))),
        "a message nobody sent: {end:?}"
    );
    assert!(
        cut_after >= Duration::from_secs(5),
        "cut {cut_after:?} after SIGTERM: before linger (1 s) + drain (5 s) were over"
    );
    assert!(
        cut_after < Duration::from_secs(12),
        "cut {cut_after:?} after SIGTERM: linger (1 s) + drain (5 s) were long over"
    );
    let code = within("the sidecar to exit", Duration::from_secs(25), exit)
        .await
        .expect("the terminate task");
    assert_eq!(code, Some(0), "the sidecar's exit code");
    assert!(
        matches!(next_seen(&mut seen).await, Seen::Ended { .. }),
        "the cut reaches the app's end too"
    );

    // A new caller: the handshake works until the allow-list leaves the
    // caller out, then gets 403 from ws's sidecar.
    let _caller2 = mesh
        .sidecar("client", "c2", 52, &no_app(&mesh, 52), &[])
        .await;
    let ws = open_ws(mesh.outbound(52), "/chat").await;
    drop(ws);
    mesh.put_config("ws", json!({"allow": ["billing"]})).await;
    let outbound = mesh.outbound(52);
    eventually(
        "the allow-list refuses the websocket handshake",
        Duration::from_secs(10),
        || async move {
            match ws_handshake(outbound, "/chat").await {
                Err(WsError::Http(rsp)) => {
                    rsp.status() == 403 && rsp.headers().contains_key("x-signpost-error")
                }
                _ => false,
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_out_of_the_mesh_and_egress_deny_refuses() {
    let mesh = mesh().await;
    let (acceptor, _) = tls_pair();
    let tls_served = tls_app("127.0.72.30:8443", acceptor).await;
    let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let plain_port = plain.local_addr().expect("local addr").port();
    http_app(plain);
    let _allow = mesh
        .sidecar("client", "c1", 81, &no_app(&mesh, 81), &[])
        .await;
    let _deny = mesh
        .sidecar(
            "client",
            "c3",
            83,
            &no_app(&mesh, 83),
            &args(&["--egress", "deny"]),
        )
        .await;

    // https_proxy egress: curl tunnels its TLS through CONNECT.
    let proxy = format!("http://{}", mesh.outbound(81));
    let curl = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-s", "-S", "-k", "--max-time", "10", "-x", &proxy])
            .arg("https://127.0.72.30:8443/")
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .output()
            .expect("run curl")
    });
    let out = within("curl", Duration::from_secs(15), curl)
        .await
        .expect("the curl task");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello over tls");
    assert_eq!(tls_served.load(Ordering::SeqCst), 1);

    // A tunnel to `localhost:PORT` carries whatever the app sends.
    let authority = format!("localhost:{plain_port}");
    let (tunnel, head) = connect(mesh.outbound(81), &authority).await;
    assert_eq!(status_of(&head), 200, "{head}");
    let rsp = get_over(tunnel, &authority).await;
    assert!(rsp.ends_with("hello over http"), "{rsp}");

    // Plain http:// to a host outside the mesh goes out too.
    let url = format!("http://{authority}/");
    let rsp = via(mesh.outbound(81))
        .get(&url)
        .send()
        .await
        .expect("egress");
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.text().await.expect("body"), "hello over http");
    let m = mesh.metrics_of(81).await;
    let external = metric(
        &m,
        "signpost_sidecar_requests_total{direction=\"outbound\",service=\"external\",status=\"200\"}",
    );
    assert_eq!(external, 3.0, "two CONNECTs and a GET went out\n{m}");

    // With --egress deny, neither a tunnel nor a plain call leaves.
    let (_, head) = connect(mesh.outbound(83), "127.0.72.30:8443").await;
    assert_eq!(status_of(&head), 403, "{head}");
    assert!(has_header(&head, "x-signpost-error"), "{head}");
    let rsp = via(mesh.outbound(83))
        .get(&url)
        .send()
        .await
        .expect("a response");
    assert_eq!(rsp.status(), 403);
    assert!(rsp.headers().contains_key("x-signpost-error"));
    assert_eq!(
        tls_served.load(Ordering::SeqCst),
        1,
        "a denied CONNECT reached the TLS server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_mesh_name_carries_mesh_http_and_opaque_tls() {
    let mesh = mesh().await;
    let mut users = [
        mesh.pod("user", "u1", 111).await,
        mesh.pod("user", "u2", 112).await,
    ];
    let (acceptor, connector) = tls_pair();
    let tls_app_addr = format!("{}:8080", mesh.ip(114));
    let _tls_served = tls_app(&tls_app_addr, acceptor).await;
    let _tls_sidecar = mesh.sidecar("tls", "t1", 114, &tls_app_addr, &[]).await;
    let _caller = mesh
        .sidecar("client", "c1", 121, &no_app(&mesh, 121), &[])
        .await;
    let outbound = mesh.outbound(121);

    // Both user instances known to the caller before the tunnel opens, so
    // that the tunnel alone decides whether requests are spread.
    let client = via(outbound);
    let mut served = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while served.len() < 2 {
        assert!(Instant::now() < deadline, "only {served:?} answered");
        if let Ok(r) = client.get("http://user/users/1").send().await
            && let Ok(v) = r.json::<Value>().await
            && let Some(s) = v["served_by"].as_str()
        {
            served.insert(s.to_string());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Mesh HTTP inside one CONNECT tunnel: routed by the inner Host, as if
    // sent straight to the outbound (the callee sees the caller), and
    // balanced per request, not pinned to one instance per tunnel.
    let (tunnel, head) = connect(outbound, "user.xingren.host:80").await;
    assert_eq!(status_of(&head), 200, "{head}");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tunnel))
            .await
            .expect("an HTTP/1.1 handshake in the tunnel");
    tokio::spawn(conn);
    let mut get = async |i: u64| -> (http::StatusCode, Value) {
        let req = http::Request::get(format!("/users/{i}"))
            .header(http::header::HOST, "user.xingren.host")
            .body(Empty::new())
            .expect("a request");
        within("a request in the tunnel", Duration::from_secs(10), async {
            sender.ready().await.expect("the tunnel's connection");
            let rsp = sender.send_request(req).await.expect("a response");
            let status = rsp.status();
            let body = rsp
                .into_body()
                .collect()
                .await
                .expect("the body")
                .to_bytes();
            (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
        })
        .await
    };
    let mut served = Vec::new();
    for i in 0..10 {
        let (status, v) = get(i).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["id"], i, "{v}");
        assert_eq!(v["caller"], "client", "{v}");
        served.push(v["served_by"].as_str().unwrap_or_default().to_string());
    }
    // The balancer favours the faster instance, so ten calls in a row may
    // all go to one. Once its app is down, its sidecar answers 503
    // not-forwarded and the caller's sidecar sends the call to the other:
    // in this same tunnel, which a tunnel pinned to one instance could not.
    let last = served.last().cloned().unwrap_or_default();
    let (down, other) = if last == "u1" { (0, "u2") } else { (1, "u1") };
    users[down].app.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 10.. {
        let (status, v) = get(i).await;
        if status == 200 {
            served.push(v["served_by"].as_str().unwrap_or_default().to_string());
        }
        if served.iter().any(|s| s == other) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every call in the tunnel went to {last}: {served:?}"
        );
    }
    served.sort();
    served.dedup();
    assert_eq!(
        served,
        ["u1", "u2"],
        "calls in one tunnel reach both instances"
    );

    // TLS inside the tunnel: carried untouched to the tls app (the
    // handshake verifies the app's own certificate, which no sidecar has).
    eventually(
        "TLS through CONNECT tls.xingren.host:443 reaches the app",
        Duration::from_secs(20),
        || {
            let connector = connector.clone();
            async move {
                let attempt = async {
                    let (tunnel, head) = connect(outbound, "tls.xingren.host:443").await;
                    if status_of(&head) != 200 {
                        return String::new();
                    }
                    let name = ServerName::try_from("localhost").expect("a server name");
                    match connector.connect(name, tunnel).await {
                        Ok(tls) => get_over(tls, "tls.xingren.host").await,
                        Err(_) => String::new(),
                    }
                };
                tokio::time::timeout(Duration::from_secs(5), attempt)
                    .await
                    .is_ok_and(|rsp| rsp.ends_with("hello over tls"))
            }
        },
    )
    .await;
}
