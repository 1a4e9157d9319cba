//! A bare `/metrics` and `/readyz` endpoint for processes without the API
//! (`signpost dns`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Serves `registry` at `http://addr/metrics`, and `/readyz` (200 when
/// `ready()`, else 503), until `cancel` fires.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
    cancel: CancellationToken,
) -> Result<()> {
    let registry = Arc::new(registry);
    let app = Router::new()
        .route(
            "/readyz",
            get(move || async move {
                if ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "catalog not loaded from etcd yet\n",
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut body, &registry);
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
    });
    Ok(())
}
