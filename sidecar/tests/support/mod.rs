//! Helpers for the sidecar's integration tests: a tiny app, and polling
//! with a deadline instead of sleeping.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Starts an app on `ip`:0 that answers `<name> <path> caller=<x-signpost-caller> host=<host>`.
/// `/status/N` answers status N; `/sleep/MS` waits MS milliseconds first.
pub async fn app(ip: &str, name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let header = |h: &str| {
                        req.headers()
                            .get(h)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_string()
                    };
                    let mut status = 200;
                    if let Some(code) = path.strip_prefix("/status/") {
                        status = code.parse().unwrap_or(400);
                    }
                    if let Some(ms) = path.strip_prefix("/sleep/") {
                        let ms: u64 = ms.parse().unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    let text = format!(
                        "{name} {path} caller={} host={} hop={}",
                        header("x-signpost-caller"),
                        header("host"),
                        header("x-signpost-hop")
                    );
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(text)))
                            .unwrap(),
                    )
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A loopback address with nothing listening (bound, then closed).
pub async fn closed_port(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client sending everything through the sidecar's outbound port.
pub fn proxied(outbound: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{outbound}")).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// GET `url` through the sidecar's outbound port.
pub async fn get_via(outbound: SocketAddr, url: &str) -> reqwest::Response {
    proxied(outbound).get(url).send().await.unwrap()
}

/// The `x-signpost-error` header of an answer the sidecar gave itself.
pub fn mesh_error(rsp: &reqwest::Response) -> String {
    rsp.headers()
        .get("x-signpost-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no x-signpost-error header in {rsp:?}"))
        .to_string()
}

/// A client sending requests straight to the address in the URL.
pub fn direct() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}
