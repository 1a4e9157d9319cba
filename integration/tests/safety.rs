//! Request safety through real sidecars: a POST is never run twice, a
//! sidecar without a certificate answers at once, a slow upload completes
//! while a stalled one ends, HTTP/1.1 trailers pass, and oversized headers
//! get a 431 that says why. The apps are in this process (so they can count
//! what they run); the sidecars and the control plane are real processes,
//! on 127.0.73.x.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use signpost_integration::mesh::{Mesh, MeshOptions};
use signpost_integration::{eventually, wait_http_ok};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NET: u8 = 73;

type AppBody = BoxBody<Bytes, Infallible>;

fn text(s: impl Into<Bytes>) -> AppBody {
    Full::new(s.into()).boxed()
}

/// Serves HTTP/1.1 on `addr` with `handler`, in this process.
async fn app<F, Fut>(addr: &str, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<AppBody>> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

fn services(names: &[&str]) -> MeshOptions {
    MeshOptions {
        services: names.iter().map(|s| s.to_string()).collect(),
        ..MeshOptions::default()
    }
}

/// A client whose calls go through the sidecar on `host`.
fn via(mesh: &Mesh, host: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", mesh.outbound(host))).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn mesh_error(rsp: &reqwest::Response) -> String {
    rsp.headers()
        .get("x-signpost-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A `pay` app that counts the charges it runs; each takes 2 s.
async fn pay_app(addr: String, charges: Arc<AtomicUsize>) {
    app(&addr, move |req: Request<Incoming>| {
        let charges = charges.clone();
        async move {
            if req.method() == http::Method::POST {
                charges.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(2)).await;
                return Response::new(text("charged"));
            }
            Response::new(text("ok"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_not_run_twice_when_the_callee_sidecar_dies() {
    let mesh = Mesh::start_with(NET, services(&["pay", "client"])).await;
    let charges = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let mut sidecars = Vec::new();
    for (i, host) in [11u8, 12].into_iter().enumerate() {
        let addr = format!("{}:8080", mesh.ip(host));
        pay_app(addr.clone(), charges[i].clone()).await;
        sidecars.push(Some(
            mesh.sidecar("pay", &format!("p{host}"), host, &addr, &[])
                .await,
        ));
    }
    let _client = mesh
        .sidecar("client", "c1", 21, "127.0.73.21:9999", &[])
        .await;
    let http = via(&mesh, 21);
    let total = || {
        charges
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .sum::<usize>()
    };
    for attempt in 0..2 {
        // Both instances answer before the POST goes.
        eventually(
            "both pay instances in rotation",
            Duration::from_secs(20),
            || {
                let http = http.clone();
                let mesh = &mesh;
                async move {
                    let _ = http.get("http://pay/ping").send().await;
                    mesh.metrics_of(21)
                        .await
                        .contains("signpost_sidecar_endpoints{service=\"pay\"} 2")
                }
            },
        )
        .await;
        let counts = || charges.each_ref().map(|c| c.load(Ordering::SeqCst));
        let before = counts();
        let post = {
            let http = http.clone();
            tokio::spawn(async move { http.post("http://pay/charge").body("42").send().await })
        };
        eventually("the charge started", Duration::from_secs(5), || async {
            total() == before[0] + before[1] + 1
        })
        .await;
        // Kill the sidecar of the instance running it, mid-request.
        let running = if counts()[0] > before[0] { 0 } else { 1 };
        if let Some(mut sidecar) = sidecars[running].take() {
            sidecar.kill();
        }
        let rsp = post.await.unwrap().unwrap();
        assert_eq!(rsp.status(), 502, "attempt {attempt}");
        let why = mesh_error(&rsp);
        assert!(why.contains("may have been processed"), "{why}");
        // The handler would have finished by now on either instance.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            total(),
            before[0] + before[1] + 1,
            "the POST ran twice (attempt {attempt})"
        );
        // Back to two instances for the next attempt.
        let host = [11u8, 12][running];
        let addr = format!("{}:8080", mesh.ip(host));
        sidecars[running] = Some(
            mesh.sidecar("pay", &format!("p{host}-{attempt}"), host, &addr, &[])
                .await,
        );
    }
}

/// Sends one gRPC-looking request over h2c to `outbound` for `authority`;
/// the response head.
async fn grpc_head(outbound: SocketAddr, authority: &str) -> http::response::Parts {
    let stream = TcpStream::connect(outbound).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("http://{authority}/signpost.echo.v1.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let rsp = send.send_request(req).await.unwrap();
    rsp.into_parts().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_without_a_certificate_answers_at_once() {
    let mesh = Mesh::start_with(
        NET + 1,
        MeshOptions {
            with_ca: false,
            ..services(&["user", "client"])
        },
    )
    .await;
    // An outside host, reachable without the mesh.
    let outside = format!("{}:8080", mesh.ip(30));
    app(&outside, |_| async { Response::new(text("outside")) }).await;
    let _sidecar = mesh.sidecar_unready("client", "c1", 21, "127.0.74.21:9999", &[]);
    let http = via(&mesh, 21);
    let outbound = mesh.outbound(21);
    eventually("the outbound listens", Duration::from_secs(10), || async {
        TcpStream::connect(outbound).await.is_ok()
    })
    .await;

    let started = Instant::now();
    let rsp = http.get("http://user/users/1").send().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(rsp.status(), 503);
    let why = mesh_error(&rsp);
    assert!(why.starts_with("no certificate yet: "), "{why}");

    // gRPC callers get UNAVAILABLE, at once too.
    let started = Instant::now();
    let head = grpc_head(outbound, "user.xingren.host").await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["grpc-status"], "14", "{:?}", head.headers);

    // Calls leaving the mesh still go out.
    let rsp = http.get(format!("http://{outside}/")).send().await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.text().await.unwrap(), "outside");

    // The inbound answers too, rather than holding the connection.
    let started = Instant::now();
    let rsp = reqwest::Client::new()
        .get(format!("http://{}:15006/users/1", mesh.ip(21)))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(rsp.status(), 503);
    assert!(mesh_error(&rsp).starts_with("no certificate yet"));
    let ready = reqwest::get(format!("http://{}:15000/ready", mesh.ip(21)))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
}

/// An app that reads the whole request body and answers its length.
async fn counting_app(addr: &str) {
    app(addr, |req: Request<Incoming>| async move {
        match req.into_body().collect().await {
            Ok(body) => Response::new(text(body.to_bytes().len().to_string())),
            Err(err) => Response::builder()
                .status(400)
                .body(text(err.to_string()))
                .unwrap(),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_completes_and_a_stalled_one_ends() {
    let mesh = Mesh::start_with(NET + 2, services(&["up", "client"])).await;
    let addr = format!("{}:8080", mesh.ip(11));
    counting_app(&addr).await;
    let short = ["--request-timeout", "2s", "--body-idle-timeout", "2s"].map(String::from);
    let _up = mesh.sidecar("up", "up1", 11, &addr, &short).await;
    let _client = mesh
        .sidecar("client", "c1", 21, "127.0.75.21:9999", &short)
        .await;
    let http = via(&mesh, 21);

    // Five pieces a second apart: longer than the request timeout, which
    // counts from the end of the body.
    let pieces = futures::stream::unfold(0, |n| async move {
        if n == 5 {
            return None;
        }
        if n > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 100_000]))),
            n + 1,
        ))
    });
    let started = Instant::now();
    let rsp = http
        .post("http://up/upload")
        .body(reqwest::Body::wrap(StreamBody::new(pieces)))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_secs(4));
    assert_eq!(rsp.status(), 200, "{}", mesh_error(&rsp));
    assert_eq!(rsp.text().await.unwrap(), "500000");

    // One piece, then nothing: cut after the body idle timeout.
    let stalled = futures::stream::unfold(0, |n| async move {
        if n > 0 {
            futures::future::pending::<()>().await;
        }
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"start"))),
            n + 1,
        ))
    });
    let started = Instant::now();
    let rsp = http
        .post("http://up/upload")
        .body(reqwest::Body::wrap(StreamBody::new(stalled)))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "ended only after {took:?}");
    assert_eq!(rsp.status(), 408, "{}", mesh_error(&rsp));
    assert!(
        mesh_error(&rsp).contains("sent nothing"),
        "{}",
        mesh_error(&rsp)
    );
}

/// Writes `request` on a new connection to `addr` and reads the whole
/// answer (the request asks to close).
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_and_oversized_headers_get_a_431_that_says_why() {
    let mesh = Mesh::start_with(NET + 3, services(&["tr", "client"])).await;
    let addr = format!("{}:8080", mesh.ip(11));
    app(&addr, |_| async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", "42".parse().unwrap());
        let frames = futures::stream::iter([
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"body"))),
            Ok(Frame::trailers(trailers)),
        ]);
        Response::builder()
            .header("trailer", "x-sum")
            .body(StreamBody::new(frames).boxed())
            .unwrap()
    })
    .await;
    // An HTTP/1.1-only app: HTTP/2 callers reach it as HTTP/1.1.
    let http1 = ["--app-protocol", "http1"].map(String::from);
    let _tr = mesh.sidecar("tr", "t1", 11, &addr, &http1).await;
    let _client = mesh
        .sidecar("client", "c1", 21, "127.0.76.21:9999", &[])
        .await;
    let outbound = mesh.outbound(21);
    wait_http_ok(
        &format!("http://{}:15000/ready", mesh.ip(21)),
        Duration::from_secs(5),
    )
    .await;

    let answer = raw(
        outbound,
        b"GET /t HTTP/1.1\r\nhost: tr.xingren.host\r\nte: trailers\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let tail = answer.split("\r\n0\r\n").nth(1).unwrap_or_default();
    assert!(tail.contains("x-sum: 42"), "no trailer in {answer:?}");

    // 70 KB of headers: 431 with the reason, and the connection lives on.
    let big = "a".repeat(70 * 1024);
    let mut stream = TcpStream::connect(outbound).await.unwrap();
    let req = format!("GET /t HTTP/1.1\r\nhost: tr.xingren.host\r\nx-big: {big}\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    assert!(
        head.contains("x-signpost-error: request headers of"),
        "{head}"
    );
    stream
        .write_all(b"GET /t HTTP/1.1\r\nhost: tr.xingren.host\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rest).contains("HTTP/1.1 200"),
        "the connection did not survive the 431"
    );

    // The same over HTTP/2: a status, not a dead connection.
    let stream = TcpStream::connect(outbound).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://tr.xingren.host/t")
        .header("x-big", big.as_str())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let rsp = send.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 431, "{:?}", rsp.headers());
    assert!(rsp.headers().contains_key("x-signpost-error"));
    let req = Request::get("http://tr.xingren.host/t")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let rsp = send.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
}
