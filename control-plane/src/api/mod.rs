//! The HTTP API of ../shared/CONTRACT.md, on axum.
//!
//! Reads come from the catalog snapshot and never call the store; writes go
//! to the store and answer 503 (never hang) when it is unreachable. Every
//! write needs a token (see [`auth`]); in `--dev`, loopback callers need none.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

pub mod auth;
pub mod certs;
pub mod error;
pub mod extract;
pub mod services;

use self::auth::AuthConfig;
use self::error::ApiError;
use self::extract::JsonBody;
use crate::catalog::Catalog;
use crate::model::{ServiceName, TokenRecord};
use crate::store::{Keys, Store};
use crate::tokens;

/// Largest request body: a registration is well under 1 KiB; 64 KiB leaves
/// room for large metadata while keeping a flood of big bodies cheap.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Time limit of a non-blocking request. The store answers or fails within
/// its own operation timeout (3 s by default); this is the outer bound.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Header carrying the blocking-query index.
pub const INDEX_HEADER: &str = "x-signpost-index";

/// What the server's flags decide about the API (`signpost server
/// --check-allow ...`); the default is the contract's.
#[derive(Debug, Clone, Default)]
pub struct ApiPolicy {
    /// Networks a health check may probe besides its own instance's
    /// address (`--check-allow`); empty: only the instance itself.
    pub check_allow: Vec<ipnet::IpNet>,
    /// Connection limits.
    pub limits: ConnectionLimits,
    /// Whether catalog, config and metrics reads need a token
    /// (`--acl-read token`).
    pub read_needs_token: bool,
}

/// Everything a handler needs.
#[derive(Clone)]
pub struct ApiState {
    /// The store, for writes.
    pub store: Arc<dyn Store>,
    /// The catalog, for reads.
    pub catalog: Arc<Catalog>,
    /// The key layout.
    pub keys: Keys,
    /// Token checking.
    pub auth: AuthConfig,
    /// Every metric of this process, encoded at `/metrics`.
    pub registry: Arc<Registry>,
    /// The API's own metrics.
    pub metrics: ApiMetrics,
    /// The mesh CA, when this control plane issues certificates.
    pub ca: Option<Arc<certs::CertAuthority>>,
    /// The server's API settings.
    pub policy: Arc<ApiPolicy>,
    /// The service tokens, from the store's watch.
    pub tokens: Arc<tokens::TokenCache>,
    /// Failed authentications by client IP.
    pub auth_failures: Arc<auth::AuthFailures>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

/// The API's metrics.
#[derive(Clone)]
pub struct ApiMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    revision: Gauge,
    services: Gauge,
    instances: Gauge,
    healthy: Gauge,
    synced: Gauge,
    connections: Gauge,
    refused: Family<RefusedLabels, Counter>,
}

impl ApiMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            revision: Gauge::default(),
            services: Gauge::default(),
            instances: Gauge::default(),
            healthy: Gauge::default(),
            synced: Gauge::default(),
            connections: Gauge::default(),
            refused: Family::default(),
        };
        registry.register(
            "signpost_api_connections",
            "Open API connections",
            m.connections.clone(),
        );
        registry.register(
            "signpost_api_connections_refused",
            "API connections closed at once for being past a limit (per_client or total)",
            m.refused.clone(),
        );
        registry.register(
            "signpost_api_requests",
            "API requests by method, route and status",
            m.requests.clone(),
        );
        registry.register(
            "signpost_api_request_duration_seconds",
            "API request latency",
            m.duration.clone(),
        );
        registry.register(
            "signpost_catalog_revision",
            "Store revision of the current catalog snapshot",
            m.revision.clone(),
        );
        registry.register(
            "signpost_catalog_services",
            "Services in the catalog",
            m.services.clone(),
        );
        registry.register(
            "signpost_catalog_instances",
            "Registered instances in the catalog",
            m.instances.clone(),
        );
        registry.register(
            "signpost_catalog_healthy_instances",
            "Healthy instances in the catalog",
            m.healthy.clone(),
        );
        registry.register(
            "signpost_catalog_synced",
            "1 while the catalog watch is connected to the store",
            m.synced.clone(),
        );
        m
    }

    fn refresh(&self, catalog: &Catalog) {
        let snap = catalog.snapshot();
        self.revision.set(snap.revision);
        self.services
            .set(i64::try_from(snap.services.len()).unwrap_or(i64::MAX));
        self.instances
            .set(i64::try_from(snap.instances).unwrap_or(i64::MAX));
        self.healthy
            .set(i64::try_from(snap.healthy).unwrap_or(i64::MAX));
        self.synced.set(i64::from(catalog.is_synced()));
    }
}

/// Builds the router.
pub fn router(state: ApiState) -> Router {
    let writes_and_reads = Router::new()
        .route("/v1/services", get(services::list_services))
        .route(
            "/v1/services/{svc}/instances/{id}",
            put(services::register).delete(services::deregister),
        )
        .route(
            "/v1/services/{svc}/instances/{id}/heartbeat",
            put(services::heartbeat),
        )
        .route(
            "/v1/services/{svc}/instances/{id}/health",
            put(services::report_health),
        )
        .route(
            "/v1/services/{svc}/config",
            put(services::put_config).get(services::get_config),
        )
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{accessor}", delete(revoke_token))
        .route("/v1/certs", post(certs::issue))
        .route("/v1/ca/roots", get(certs::roots))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let writes_and_reads = writes_and_reads.layer(TimeoutLayer::with_status_code(
        StatusCode::SERVICE_UNAVAILABLE,
        REQUEST_TIMEOUT,
    ));
    // Blocking queries wait up to MAX_WAIT, so they sit outside the timeout.
    let blocking = Router::new().route("/v1/services/{svc}", get(services::get_service));
    let routes = writes_and_reads
        .merge(blocking)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), read_acl))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(RequestBodyLimitLayer::new(BODY_LIMIT))
        .layer(middleware::from_fn(error::limit_headers))
        .with_state(state);
    // Around the whole router rather than its routes, so that answers the
    // routing itself makes (405 with its `Allow`) pass through it too.
    Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn(error::json_errors))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see the API table in the README")
}

/// With `--acl-read token`, catalog, config and metrics reads need a valid
/// token (any: the admin's or a service's). The trust bundle, `/healthz` and
/// `/readyz` stay open, for sidecars bootstrapping and for probes.
async fn read_acl(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    let guarded = state.policy.read_needs_token
        && (req.method() == axum::http::Method::GET || req.method() == axum::http::Method::HEAD)
        && (path == "/metrics" || path == "/v1/services" || path.starts_with("/v1/services/"));
    if guarded && let Err(err) = auth::authenticate(&state, req.headers(), peer).await {
        return err.into_response();
    }
    next.run(req).await
}

async fn observe(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status,
        })
        .inc();
    state
        .metrics
        .duration
        .observe(start.elapsed().as_secs_f64());
    resp
}

/// Limits on the API's connections, as Consul's `http_max_conns_per_client`
/// and a web server's header timeout: a client cannot hold the API with
/// idle or half-sent connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// How long a connection may take to send a request's headers, and how
    /// long an idle keep-alive connection waits for its next request (hyper
    /// runs one timer for both: it starts whenever the connection waits for
    /// a request head). Once the headers are in, a request (a blocking
    /// query) may take as long as it needs.
    pub header_read_timeout: Duration,
    /// Open connections per client IP; more are closed at once.
    pub per_client: usize,
    /// Open connections in all; more are closed at once.
    pub total: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            // 10 s: a client on a slow link sends a few hundred bytes of
            // headers in far less, and a scanner holding sockets open is let
            // go quickly.
            header_read_timeout: Duration::from_secs(10),
            // Consul's default `http_max_conns_per_client`.
            per_client: 200,
            // Well under the file descriptors a server is usually given.
            total: 10_000,
        }
    }
}

/// How long shutdown waits for requests in flight (a blocking query may
/// otherwise hold it for minutes).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

/// Open connections per client IP, and in all.
#[derive(Default)]
struct ConnectionCounts {
    per_ip: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    total: std::sync::atomic::AtomicUsize,
}

/// One admitted connection; counted until dropped.
struct Admitted {
    counts: Arc<ConnectionCounts>,
    ip: std::net::IpAddr,
}

impl ConnectionCounts {
    /// Admits a connection from `ip`, or says which limit it is past.
    fn admit(
        self: &Arc<Self>,
        ip: std::net::IpAddr,
        limits: &ConnectionLimits,
    ) -> Result<Admitted, &'static str> {
        use std::sync::atomic::Ordering;
        let mut per_ip = self
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.total.load(Ordering::Relaxed) >= limits.total {
            return Err("total");
        }
        let open = per_ip.entry(ip).or_insert(0);
        if *open >= limits.per_client {
            return Err("per_client");
        }
        *open += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(Admitted {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        let mut per_ip = self
            .counts
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(open) = per_ip.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.counts.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the API on `listener` until `cancel` fires, within the state's
/// [`ConnectionLimits`]; then drains requests in flight for up to 10 s.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let limits = state.policy.limits;
    let metrics = state.metrics.clone();
    let app = router(state);
    let counts = Arc::new(ConnectionCounts::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Past error::MAX_HEADERS the API answers 431 in JSON; hyper's own
        // (bare) 431 is for twice as many.
        .max_headers(error::MAX_HEADERS * 2);
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(%err, "cannot accept an API connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let admitted = match counts.admit(peer.ip(), &limits) {
            Ok(admitted) => admitted,
            Err(limit) => {
                metrics
                    .refused
                    .get_or_create(&RefusedLabels { limit })
                    .inc();
                tracing::debug!(%peer, limit, "API connection refused: past the connection limit");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                app.clone().oneshot(req)
            });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        metrics.connections.inc();
        let connections = metrics.connections.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = cancel.cancelled() => {
                    // Finish the request in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%peer, %err, "API connection ended");
            }
            connections.dec();
            drop(admitted);
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_DRAIN, tracker.wait())
        .await
        .is_err()
    {
        tracing::info!("API requests still in flight after {SHUTDOWN_DRAIN:?}; closing them");
    }
    Ok(())
}

/// Shortest `ttl` of a token.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Longest `ttl` of a token (ten years; without `ttl` a token never
/// expires).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `POST /v1/tokens` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The service the token may act for.
    pub service: ServiceName,
    /// How long the token is accepted (`"720h"`); absent: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// `POST /v1/tokens` answer. The token is shown once; only its hash is kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenReply {
    /// The service.
    pub service: ServiceName,
    /// The token.
    pub token: String,
    /// Its non-secret id, to list and revoke it by.
    #[serde(default)]
    pub accessor: String,
    /// When it expires, if it does.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires: Option<std::time::SystemTime>,
}

/// One row of `GET /v1/tokens`: never the token, nor its hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The accessor id.
    pub accessor: String,
    /// The service it acts for.
    pub service: ServiceName,
    /// When it was made.
    #[serde(with = "humantime_serde")]
    pub created: std::time::SystemTime,
    /// When it expires, if it does.
    #[serde(default, with = "humantime_serde")]
    pub expires: Option<std::time::SystemTime>,
}

/// `GET /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenList {
    /// Every service token, oldest first.
    pub tokens: Vec<TokenInfo>,
}

async fn create_token(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<TokenRequest>,
) -> Result<(StatusCode, axum::Json<TokenReply>), ApiError> {
    auth::authenticate(&state, &headers, peer)
        .await?
        .must_be_admin("creating tokens")?;
    let created = std::time::SystemTime::now();
    let expires = match &req.ttl {
        None => None,
        Some(raw) => {
            let ttl = crate::model::parse_duration("ttl", raw)
                .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
            if !(MIN_TOKEN_TTL..=MAX_TOKEN_TTL).contains(&ttl) {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    format!(
                        "ttl {raw:?} is out of range: a token's ttl is 1m to 87600h (ten years)"
                    ),
                ));
            }
            Some(created + ttl)
        }
    };
    let token = tokens::generate();
    let record = TokenRecord {
        service: req.service.clone(),
        created,
        accessor: tokens::generate_accessor(),
        expires,
    };
    let value = serde_json::to_vec(&record)
        .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
    let hash = tokens::hash(&token);
    state
        .store
        .put(&state.keys.token(&hash), value, None)
        .await?;
    tracing::info!(service = %req.service, accessor = %record.accessor, "service token created");
    // Usable here as soon as it is answered (read your writes).
    state
        .tokens
        .wait_for(Duration::from_secs(1), |t| t.get(&hash).is_some())
        .await;
    Ok((
        StatusCode::CREATED,
        axum::Json(TokenReply {
            service: req.service,
            token,
            accessor: record.accessor,
            expires,
        }),
    ))
}

async fn list_tokens(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<axum::Json<TokenList>, ApiError> {
    auth::authenticate(&state, &headers, peer)
        .await?
        .must_be_admin("listing tokens")?;
    let tokens = state
        .tokens
        .list()
        .into_iter()
        .map(|t| TokenInfo {
            accessor: t.record.accessor,
            service: t.record.service,
            created: t.record.created,
            expires: t.record.expires,
        })
        .collect();
    Ok(axum::Json(TokenList { tokens }))
}

async fn revoke_token(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(accessor): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    auth::authenticate(&state, &headers, peer)
        .await?
        .must_be_admin("revoking tokens")?;
    let Some(known) = state.tokens.by_accessor(&accessor) else {
        return Err(ApiError::not_found(format!(
            "no token has accessor {accessor:?} (`signpost token list` shows them)"
        )));
    };
    state.store.delete(&[state.keys.token(&known.hash)]).await?;
    tracing::info!(service = %known.record.service, %accessor, "service token revoked");
    state
        .tokens
        .wait_for(Duration::from_secs(1), |t| t.get(&known.hash).is_none())
        .await;
    Ok(StatusCode::NO_CONTENT)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready while the store answers: a control plane that cannot write should be
/// taken out of a load balancer.
async fn readyz(State(state): State<ApiState>) -> Response {
    let not_ready = |message: String| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message).into_response()
    };
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(_)) if state.catalog.is_synced() => (StatusCode::OK, "ready\n").into_response(),
        Ok(Ok(_)) => not_ready("catalog not synced yet".into()),
        Ok(Err(err)) => not_ready(format!("store unreachable: {err}")),
        Err(_) => not_ready("store did not answer within 2s".into()),
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    state.metrics.refresh(&state.catalog);
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(%err, "could not encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
