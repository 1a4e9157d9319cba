//! The HTTP front of the outbound side: what the app talks to.
//!
//! The app sends HTTP/1.1 or HTTP/2 with prior knowledge (gRPC) here,
//! told apart by the connection preface, either as to a forward proxy
//! (`GET http://user/users/1`, what clients send with `http_proxy` set) or
//! straight to the port with a `Host` header or `:authority`
//! (`user.xingren.host`). Each request is balanced on its own, so one
//! long-lived HTTP/2 connection from the app spreads its calls over every
//! instance. The host decides the route:
//!
//! - `user` or `user.<zone>` (any port): the mesh destination `user`, over
//!   the balanced, retried, mTLS stack of [`super::Destinations`];
//! - anything else (another domain, an IP address, `localhost`): forwarded
//!   as plain HTTP to that host, outside the mesh, so `http_proxy` can be
//!   set for a whole process without breaking its other calls
//!   (`--egress deny` refuses them).
//!
//! HTTP/1.1 Upgrades (WebSocket) pass through, and `CONNECT` opens a
//! tunnel: out of the mesh to another host, or into it to a mesh name.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use signpost_control_plane::model::ServiceName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{Instrument, debug, info_span};

use super::endpoint::UpgradeRequest;
use super::{Destination, Destinations};
use crate::body::{self, BoxError, ProxyBody};
use crate::deadline::{Timers, deadline_of};
use crate::error::{Caller, ProxyError, SidecarError};
use crate::headers::{
    Head, MAX_HEADER_BYTES, ORIG_PROTO_HEADER, enter_hop, innermost, passed_through,
    restore_upgrade, strip_hop_by_hop, strip_hop_by_hop_and, upgrade_protocol,
};
use crate::inbound::{HANDSHAKE_TIMEOUT, TLS_HANDSHAKE};
use crate::metrics::{Direction, Metrics, RequestMetrics};
use crate::serve::{self, Upgrades};
use crate::tls::MeshSlot;

/// Label used in metrics for calls that leave the mesh: one label, not one
/// per host, so a crawler cannot explode the metric's cardinality.
pub const EXTERNAL: &str = "external";

/// Where an app's request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// A mesh service: its label, lower-case, not yet checked against the
    /// label rules (a known destination needs no check; see
    /// [`super::Destinations::get`]).
    Mesh(Cow<'a, str>),
    /// A host outside the mesh: the request's own authority.
    External,
}

/// The authority a request names: its URI's (absolute form) or its `Host`.
pub fn requested_authority(uri: &Uri, headers: &HeaderMap) -> Result<Authority, ProxyError> {
    if let Some(a) = uri.authority() {
        return Ok(a.clone());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| {
            ProxyError::BadRequest(
                "no destination: send an absolute URL (http://user/...) or a Host header".into(),
            )
        })?;
    host.parse::<Authority>()
        .map_err(|e| ProxyError::BadRequest(format!("invalid Host {host:?}: {e}")))
}

/// Decides the route of a request for `authority`. `zone` is lower-case
/// without the trailing dot (see [`normalize_zone`]).
pub fn target<'a>(zone: &str, authority: &'a Authority) -> Result<Target<'a>, ProxyError> {
    let raw = authority.host().trim_end_matches('.');
    // Host names arrive lower-case almost always: copy only when not.
    let host: Cow<'a, str> = if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(raw.to_ascii_lowercase())
    } else {
        Cow::Borrowed(raw)
    };
    // An IPv6 address comes bracketed in an authority, and an IPv4 one
    // starts with a digit: names are not parsed as addresses for nothing.
    let ipv4 = host.starts_with(|c: char| c.is_ascii_digit())
        && host.parse::<std::net::Ipv4Addr>().is_ok();
    if host.starts_with('[') || host == "localhost" || ipv4 {
        return Ok(Target::External);
    }
    let in_zone = host
        .strip_suffix(zone)
        .and_then(|rest| rest.strip_suffix('.'));
    let label_len = match in_zone {
        Some(rest) if rest.contains('.') => {
            return Err(ProxyError::BadRequest(format!(
                "{host}: only service names (<service>.{zone}) are routed through the mesh"
            )));
        }
        Some(rest) => rest.len(),
        None if !host.contains('.') => host.len(),
        None => return Ok(Target::External),
    };
    Ok(Target::Mesh(match host {
        Cow::Borrowed(h) => Cow::Borrowed(&h[..label_len]),
        Cow::Owned(mut h) => {
            h.truncate(label_len);
            Cow::Owned(h)
        }
    }))
}

/// The zone as [`target`] compares it: lower-case, no trailing dot. Done
/// once when the proxy is made, not per request.
pub fn normalize_zone(zone: &str) -> String {
    zone.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether the app's calls may leave the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Egress {
    /// Calls to hosts outside the zone go out as plain HTTP, and `CONNECT`
    /// to them opens a TCP tunnel.
    #[default]
    Allow,
    /// They get 403 with `x-signpost-error`.
    Deny,
}

/// Settings of the outbound front.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// This sidecar's id, for the loop guard.
    pub id: String,
    /// The mesh zone.
    pub zone: String,
    /// Limit for a response's headers, counted from the end of the request
    /// body (retries included): a slow upload is not cut by it.
    pub request_timeout: Duration,
    /// Limit for connecting to a host outside the mesh.
    pub connect_timeout: Duration,
    /// A request body that sends nothing for this long is cut: the stalled
    /// upload ends. gRPC streams, which may idle for good reasons, are not
    /// subject to it.
    pub body_idle_timeout: Duration,
    /// Whether calls may leave the mesh.
    pub egress: Egress,
}

impl OutboundConfig {
    /// Settings with the sidecar's defaults but for the names.
    pub fn new(id: impl Into<String>, zone: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            zone: zone.into(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
            body_idle_timeout: Duration::from_secs(60),
            egress: Egress::Allow,
        }
    }
}

/// The outbound HTTP proxy.
pub struct OutboundProxy {
    config: OutboundConfig,
    /// This sidecar's id as the hop header carries it.
    hop: HeaderValue,
    destinations: Arc<Destinations>,
    external: Client<HttpConnector, ProxyBody>,
    /// Requests that left the mesh.
    external_requests: RequestMetrics,
    /// Requests refused before a destination was known.
    unrouted_requests: RequestMetrics,
    /// The request timeouts' timers.
    timers: Arc<Timers>,
    /// The certificate, when mesh calls need one (`None`: plain, in tests).
    mesh: Option<MeshSlot>,
    /// WebSockets and CONNECT tunnels in progress.
    upgrades: Upgrades,
    /// `CONNECT`s to mesh names, to be served by the listener's task.
    into_mesh: mpsc::UnboundedSender<(Upgraded, ServiceName)>,
    into_mesh_rx: Mutex<Option<mpsc::UnboundedReceiver<(Upgraded, ServiceName)>>>,
}

impl std::fmt::Debug for OutboundProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundProxy")
            .field("config", &self.config)
            .finish()
    }
}

/// The result of routing one request, and the metrics it counts in.
type Routed = (RequestMetrics, Result<Response<ProxyBody>, ProxyError>);

impl OutboundProxy {
    /// A proxy routing mesh calls through `destinations`.
    pub fn new(
        config: OutboundConfig,
        destinations: Arc<Destinations>,
        metrics: Metrics,
    ) -> Result<Arc<Self>, SidecarError> {
        Self::build(config, destinations, metrics, None)
    }

    /// Like [`OutboundProxy::new`], answering mesh calls with "no
    /// certificate yet" until `mesh` holds one.
    pub fn with_mesh(
        config: OutboundConfig,
        destinations: Arc<Destinations>,
        metrics: Metrics,
        mesh: MeshSlot,
    ) -> Result<Arc<Self>, SidecarError> {
        Self::build(config, destinations, metrics, Some(mesh))
    }

    fn build(
        mut config: OutboundConfig,
        destinations: Arc<Destinations>,
        metrics: Metrics,
        mesh: Option<MeshSlot>,
    ) -> Result<Arc<Self>, SidecarError> {
        config.zone = normalize_zone(&config.zone);
        let hop = HeaderValue::from_str(&config.id).map_err(|_| {
            SidecarError::Config(format!(
                "sidecar id {:?} cannot be a header value",
                config.id
            ))
        })?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        let external = Client::builder(TokioExecutor::new()).build(http);
        let (into_mesh, into_mesh_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Self {
            config,
            hop,
            destinations,
            external,
            external_requests: metrics.requests_of(Direction::Outbound, EXTERNAL),
            unrouted_requests: metrics.requests_of(Direction::Outbound, "-"),
            timers: Timers::new(),
            mesh,
            upgrades: Upgrades::new(),
            into_mesh,
            into_mesh_rx: Mutex::new(Some(into_mesh_rx)),
        }))
    }

    /// WebSockets and tunnels open now.
    pub fn upgraded_connections(&self) -> usize {
        self.upgrades.len()
    }

    /// Serves the app's connections on `listener` until `stop`, then drains
    /// (upgraded connections too: they are cut after `drain`).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
        drain: Duration,
    ) {
        let upgrades = self.upgrades.clone();
        let stopped = stop.clone();
        let tunnels = self
            .into_mesh_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut tunnels) = tunnels {
            let this = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let (app, name) = tokio::select! {
                        () = stop.cancelled() => return,
                        next = tunnels.recv() => match next {
                            Some(next) => next,
                            None => return,
                        },
                    };
                    let span = info_span!("connect", service = %name);
                    let served = this.clone().serve_tunnelled(TokioIo::new(app), name);
                    this.upgrades.spawn(served.instrument(span));
                }
            });
        }
        let connections = serve::accept_loop(
            "outbound",
            listener,
            stop,
            drain,
            move |stream, peer, closing| {
                let this = self.clone();
                async move {
                    // `handle` owns its handle on the proxy, so its future
                    // needs no wrapper (which would move that large future
                    // once more for every request).
                    serve::serve_http(stream, closing, move |req| this.clone().handle(req)).await;
                }
                .instrument(info_span!("outbound_conn", client = %peer))
            },
        );
        tokio::join!(connections, async move {
            stopped.cancelled().await;
            upgrades.shutdown(drain).await;
        });
    }

    /// Handles one request from the app.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let head = Head::of(req.headers());
        let caller = head.caller();
        let (requests, result) = if req.method() == Method::CONNECT {
            self.connect(req).await
        } else {
            self.route(req, &head).await
        };
        let rsp = result.unwrap_or_else(|err| {
            debug!(error = %err, "answered by the sidecar");
            err.respond(caller)
        });
        requests.record(rsp.status().as_u16(), started.elapsed());
        match caller {
            Caller::Grpc => requests.observe_grpc(rsp),
            Caller::Http => rsp,
        }
    }

    /// Why mesh calls cannot be made now: no certificate yet.
    fn no_certificate(&self) -> Option<ProxyError> {
        let reason = self.mesh.as_ref()?.not_ready()?;
        Some(ProxyError::NoCertificate { reason })
    }

    /// The answer, and the metrics it counts in.
    async fn route(&self, mut req: Request<Incoming>, head: &Head) -> Routed {
        let unrouted = |err| (self.unrouted_requests.clone(), Err(err));
        if head.size > MAX_HEADER_BYTES {
            return unrouted(ProxyError::HeadersTooLarge {
                size: head.size,
                limit: MAX_HEADER_BYTES,
            });
        }
        let authority = match requested_authority(req.uri(), req.headers()) {
            Ok(authority) => authority,
            Err(err) => return unrouted(err),
        };
        let to = match target(&self.config.zone, &authority) {
            Ok(to) => to,
            Err(err) => return unrouted(err),
        };
        // The loop guard. Only a request that leaves the mesh can come back
        // here without passing an app (a peer's inbound strips the hop
        // header, as it must: an app's calls are new requests), so only
        // those carry this sidecar's id onward.
        let looped = match to {
            Target::Mesh(_) => passed_through(req.headers(), &self.config.id),
            Target::External => !enter_hop(req.headers_mut(), &self.config.id, &self.hop),
        };
        if looped {
            return unrouted(ProxyError::Loop {
                id: self.config.id.clone(),
            });
        }
        let dest = match to {
            Target::Mesh(label) => match self.destinations.get(&label) {
                Ok(dest) => Some(dest),
                Err(e) => {
                    return unrouted(ProxyError::BadRequest(format!(
                        "{label:?} is not a service name: {e}"
                    )));
                }
            },
            Target::External => None,
        };
        // HTTP/1.1 only: an HTTP/2 request has no Upgrade.
        let upgrade = match req.version() {
            Version::HTTP_11 if head.may_upgrade() => upgrade_protocol(req.headers()),
            _ => None,
        };
        let downstream = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (mut parts, incoming) = req.into_parts();
        strip_hop_by_hop_and(&mut parts.headers, head, &[]);
        if let Some(protocol) = &upgrade {
            restore_upgrade(&mut parts.headers, protocol.clone());
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let (requests, result) = match dest {
            Some(dest) => {
                if let Some(err) = self.no_certificate() {
                    return (dest.requests().clone(), Err(err));
                }
                let span = info_span!("outbound", service = %dest.name, method = %parts.method, path = %path.path());
                let result = self
                    .call_mesh(&dest, parts, path, incoming, head, upgrade.is_some())
                    .instrument(span)
                    .await;
                (dest.requests().clone(), result)
            }
            None => {
                if self.config.egress == Egress::Deny {
                    return (
                        self.external_requests.clone(),
                        Err(ProxyError::EgressDenied {
                            host: authority.host().to_string(),
                        }),
                    );
                }
                let span = info_span!("outbound", external = %authority, method = %parts.method);
                let result = self
                    .call_external(authority, parts, path, incoming, head)
                    .instrument(span)
                    .await;
                (self.external_requests.clone(), result)
            }
        };
        let result = result.map(|mut rsp| {
            if let (Some(protocol), Some(downstream)) = (upgrade, downstream)
                && rsp.status() == StatusCode::SWITCHING_PROTOCOLS
            {
                restore_upgrade(rsp.headers_mut(), protocol);
                let upstream = hyper::upgrade::on(&mut rsp);
                self.upgrades.spawn(async move {
                    match tokio::try_join!(downstream, upstream) {
                        Ok((app, peer)) => {
                            serve::splice(TokioIo::new(app), TokioIo::new(peer)).await
                        }
                        Err(err) => debug!(%err, "upgrade failed"),
                    }
                });
            }
            rsp
        });
        (requests, result)
    }

    /// `CONNECT host:port`: to a host outside the mesh, a TCP tunnel; to a
    /// mesh name, the tunnelled bytes are served as mesh HTTP (balanced per
    /// request), or, when they are not HTTP (a TLS ClientHello), carried as
    /// an opaque mTLS tunnel to the service (balanced per connection).
    async fn connect(self: &Arc<Self>, mut req: Request<Incoming>) -> Routed {
        let unrouted = |err| (self.unrouted_requests.clone(), Err(err));
        let Some(authority) = req.uri().authority().cloned() else {
            return unrouted(ProxyError::BadRequest(
                "CONNECT needs host:port as its target".into(),
            ));
        };
        let Some(port) = authority.port_u16() else {
            return unrouted(ProxyError::BadRequest(format!(
                "CONNECT {authority}: no port"
            )));
        };
        let to = match target(&self.config.zone, &authority) {
            Ok(to) => to,
            Err(err) => return unrouted(err),
        };
        let label = match to {
            Target::Mesh(label) => label.into_owned(),
            Target::External => {
                let requests = self.external_requests.clone();
                if self.config.egress == Egress::Deny {
                    return (
                        requests,
                        Err(ProxyError::EgressDenied {
                            host: authority.host().to_string(),
                        }),
                    );
                }
                let host = authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let timeout = self.config.connect_timeout;
                let remote =
                    match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
                        Ok(Ok(remote)) => remote,
                        Ok(Err(err)) => {
                            return (
                                requests,
                                Err(ProxyError::BadGateway {
                                    service: authority.to_string(),
                                    reason: err.to_string(),
                                }),
                            );
                        }
                        Err(_) => {
                            return (
                                requests,
                                Err(ProxyError::Timeout {
                                    service: authority.to_string(),
                                    after: timeout,
                                }),
                            );
                        }
                    };
                let _ = remote.set_nodelay(true);
                let tunnel = hyper::upgrade::on(&mut req);
                self.upgrades.spawn(
                    async move {
                        match tunnel.await {
                            Ok(app) => serve::splice(TokioIo::new(app), remote).await,
                            Err(err) => debug!(%err, "CONNECT: the app left before the tunnel"),
                        }
                    }
                    .instrument(info_span!("connect", external = %authority)),
                );
                return (requests, Ok(Response::new(body::empty())));
            }
        };
        let dest = match self.destinations.get(&label) {
            Ok(dest) => dest,
            Err(e) => {
                return unrouted(ProxyError::BadRequest(format!(
                    "{label:?} is not a service name: {e}"
                )));
            }
        };
        let requests = dest.requests().clone();
        if let Some(err) = self.no_certificate() {
            return (requests, Err(err));
        }
        let tunnel = hyper::upgrade::on(&mut req);
        let into_mesh = self.into_mesh.clone();
        let name = dest.name.clone();
        tokio::spawn(async move {
            match tunnel.await {
                // Served by the listener's task (see `serve`): this one
                // cannot name the future of `handle` that it is part of.
                Ok(app) => {
                    let _ = into_mesh.send((app, name));
                }
                Err(err) => debug!(%err, "CONNECT: the app left before the tunnel"),
            }
        });
        (requests, Ok(Response::new(body::empty())))
    }

    /// Serves the bytes of a `CONNECT` to mesh service `name`.
    async fn serve_tunnelled<I>(self: Arc<Self>, mut io: I, name: ServiceName)
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let mut first = [0u8; 1];
        let n = match tokio::time::timeout(HANDSHAKE_TIMEOUT, io.read(&mut first)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        let io = serve::Rewind::new(Bytes::copy_from_slice(&first[..n]), io);
        if first[0] == TLS_HANDSHAKE {
            debug!("CONNECT carries TLS: an opaque tunnel");
            self.destinations.tunnel(&name).carry(io).await;
            return;
        }
        let closing = self.upgrades.closing();
        serve::serve_http(io, closing, move |req| self.clone().handle(req)).await;
    }

    async fn call_mesh(
        &self,
        dest: &Destination,
        mut parts: http::request::Parts,
        path: PathAndQuery,
        incoming: Incoming,
        head: &Head,
        upgrade: bool,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let name = || dest.name.to_string();
        let limit = self.destinations.config().max_pending;
        let state = match dest.resolved_now() {
            Some(state) => state,
            // Boxed, so that the rare wait does not grow every request's future.
            None => Box::pin(dest.resolved()).await,
        };
        if state.endpoints == 0 {
            return Err(ProxyError::NoHealthyInstance {
                service: name(),
                dns: state.error,
            });
        }
        let version = parts.version;
        let (body, ended) = self.watch_body(body::boxed(incoming), head.grpc);
        // The peer sees the logical name as :authority; the port the app
        // used means nothing to it.
        let authority = dest.authority(&self.config.zone).ok_or_else(|| {
            ProxyError::BadRequest(format!(
                "{}.{} is not a valid authority",
                dest.name, self.config.zone
            ))
        })?;
        parts.headers.remove(header::HOST);
        if upgrade {
            // An upgrade crosses on an HTTP/1.1 connection of its own.
            parts.uri = Uri::from(path);
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
            parts.version = Version::HTTP_11;
            parts.extensions.insert(UpgradeRequest);
        } else {
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(authority);
            uri.path_and_query = Some(path);
            parts.uri = Uri::from_parts(uri).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
            if version == Version::HTTP_2 {
                parts
                    .headers
                    .insert(ORIG_PROTO_HEADER, HeaderValue::from_static("HTTP/2"));
            }
            parts.version = Version::HTTP_2;
        }
        let mut req = Request::from_parts(parts, body);
        // An empty body is replayed without a copy (see `RetryPolicy`):
        // no extension map to allocate for most requests.
        if !req.body().is_end_stream() {
            let (body, replay) = body::record(std::mem::replace(req.body_mut(), body::empty()));
            *req.body_mut() = body;
            req.extensions_mut().insert(replay);
        }
        let timeout = deadline_of(head.grpc_timeout, self.config.request_timeout);
        // Boxed as a plain `Send` future: awaiting the stack's future
        // directly trips rustc's higher-ranked `Send` inference
        // (rust-lang/rust#102211) once this runs inside `tokio::spawn`.
        let call: Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, BoxError>> + Send>> =
            Box::pin(dest.service().oneshot(req));
        let stalled = ended.as_ref().map(body::BodyEnd::stalled);
        let mut rsp = self
            .timers
            .timed(call, ended, timeout)
            .await
            .map_err(|_| ProxyError::Timeout {
                service: name(),
                after: timeout.after,
            })?
            .map_err(|e| {
                if stalled.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
                    ProxyError::BodyStalled {
                        after: self.config.body_idle_timeout,
                    }
                } else {
                    ProxyError::from_stack(&name(), &e, limit)
                }
            })?;
        strip_hop_by_hop(rsp.headers_mut());
        *rsp.version_mut() = version;
        Ok(rsp)
    }

    /// The request body, watched for its end and for stalls (see
    /// [`body::watch`]); an empty one needs no watching.
    fn watch_body(&self, body: ProxyBody, grpc: bool) -> (ProxyBody, Option<body::BodyEnd>) {
        if body.is_end_stream() {
            return (body, None);
        }
        let idle = (!grpc).then_some(self.config.body_idle_timeout);
        let (body, ended) = body::watch(body, idle);
        (body, Some(ended))
    }

    async fn call_external(
        &self,
        authority: Authority,
        mut parts: http::request::Parts,
        path: PathAndQuery,
        incoming: Incoming,
        head: &Head,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let name = authority.host().to_string();
        let version = parts.version;
        parts.uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        if !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        parts.version = Version::HTTP_11;
        let (body, ended) = self.watch_body(body::boxed(incoming), head.grpc);
        let req = Request::from_parts(parts, body);
        let timeout = deadline_of(head.grpc_timeout, self.config.request_timeout);
        let rsp = self
            .timers
            .timed(self.external.request(req), ended, timeout)
            .await
            .map_err(|_| ProxyError::Timeout {
                service: name.clone(),
                after: timeout.after,
            })?
            .map_err(|e| ProxyError::BadGateway {
                service: name.clone(),
                reason: innermost(&e),
            })?;
        let mut rsp = rsp.map(body::boxed);
        strip_hop_by_hop(rsp.headers_mut());
        *rsp.version_mut() = version;
        Ok(rsp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(uri: &str, host: Option<&str>) -> Result<Target<'static>, ProxyError> {
        let uri: Uri = uri.parse().unwrap();
        let mut headers = HeaderMap::new();
        if let Some(h) = host {
            headers.insert(header::HOST, HeaderValue::from_str(h).unwrap());
        }
        let authority = requested_authority(&uri, &headers)?;
        Ok(match target("xingren.host", &authority)? {
            Target::Mesh(label) => Target::Mesh(Cow::Owned(label.into_owned())),
            Target::External => Target::External,
        })
    }

    fn mesh(name: &str) -> Target<'static> {
        Target::Mesh(Cow::Owned(name.to_string()))
    }

    #[test]
    fn names_route_to_the_mesh_or_out() {
        assert_eq!(route("http://user/users/1", None).unwrap(), mesh("user"));
        assert_eq!(
            route("http://user.xingren.host:8080/x", None).unwrap(),
            mesh("user")
        );
        assert_eq!(
            route("/users/1", Some("USER.xingren.host.")).unwrap(),
            mesh("user")
        );
        assert_eq!(route("/", Some("user")).unwrap(), mesh("user"));
        for (uri, host) in [
            ("http://example.com/", None),
            ("http://10.1.2.3:80/", None),
            ("/", Some("localhost:8080")),
            ("http://[::1]:8080/", None),
            ("/", Some("10.1.2.3")),
        ] {
            assert_eq!(
                route(uri, host).unwrap(),
                Target::External,
                "{uri} {host:?}"
            );
        }
        assert_eq!(route("/", Some("2fa:80")).unwrap(), mesh("2fa"));
        assert!(route("/", None).is_err());
        assert!(route("http://u1.user.xingren.host/", None).is_err());
    }
}
