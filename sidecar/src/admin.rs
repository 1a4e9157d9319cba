//! The admin port: `/metrics` (Prometheus text), `/ready` and `/live`.
//!
//! `/live` answers 200 while the process serves at all (restart it
//! otherwise); `/ready` answers 200 only while the sidecar holds a
//! certificate, is registered, and is not shutting down, with the reason in
//! the body otherwise.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{ProxyBody, full};
use crate::metrics::Metrics;
use crate::register::Readiness;
use crate::serve;

/// The admin server's state.
#[derive(Debug, Clone)]
pub struct Admin {
    metrics: Metrics,
    ready: Arc<Readiness>,
}

impl Admin {
    /// An admin server reporting `metrics` and `ready`.
    pub fn new(metrics: Metrics, ready: Arc<Readiness>) -> Self {
        Self { metrics, ready }
    }

    /// Answers one admin request.
    pub fn handle<B>(&self, req: &Request<B>) -> Response<ProxyBody> {
        let text = |status: StatusCode, body: String| {
            let mut rsp = Response::new(full(body));
            *rsp.status_mut() = status;
            rsp
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
        }
        match req.uri().path() {
            "/metrics" => {
                let mut rsp = text(StatusCode::OK, self.metrics.encode());
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                rsp
            }
            "/live" => text(StatusCode::OK, "live\n".into()),
            "/ready" => match self.ready.not_ready() {
                None => text(StatusCode::OK, "ready\n".into()),
                Some(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /ready or /live\n".into(),
            ),
        }
    }

    /// Serves the admin port until `stop`.
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        let this = Arc::new(self);
        serve::accept_loop(
            "admin",
            listener,
            stop,
            Duration::from_secs(1),
            move |stream, _, closing| {
                let this = this.clone();
                async move {
                    serve::serve_http(stream, closing, move |req: Request<Incoming>| {
                        let rsp = this.handle(&req);
                        async move { rsp }
                    })
                    .await;
                }
            },
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_with_certificate_and_registration() {
        let ready = Arc::new(Readiness::default());
        let admin = Admin::new(Metrics::new(), ready.clone());
        let get = |path: &str| admin.handle(&Request::get(path).body(()).unwrap()).status();
        assert_eq!(get("/live"), 200);
        assert_eq!(get("/ready"), 503);
        ready.set_certificate(true);
        assert_eq!(get("/ready"), 503);
        ready.set_registered(true);
        assert_eq!(get("/ready"), 200);
        ready.set_stopping();
        assert_eq!(get("/ready"), 503);
        assert_eq!(get("/metrics"), 200);
        assert_eq!(get("/nope"), 404);
    }
}
