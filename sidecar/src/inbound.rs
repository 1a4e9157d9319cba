//! The inbound side: what peers' sidecars talk to.
//!
//! The inbound proxy is responsible for traffic from other services to the
//! local app. It accepts mesh TLS (TLS 1.3, client certificates), reads the
//! caller's identity, applies the service's allow-list, and forwards to the
//! app over plain HTTP/1.1 on loopback, adding `x-signpost-caller`. A
//! connection negotiating the [`crate::tls::ALPN_TCP`] protocol is an opaque
//! tunnel: its bytes go to the app unchanged.
//!
//! One port serves both mesh TLS and, in `permissive` mode, plain HTTP: the
//! first byte tells them apart (0x16 starts every TLS handshake; no HTTP
//! method starts with it). In `strict` mode plain requests and TLS without a
//! client certificate are refused. The mode and the allow-list come from
//! the service's config on the control plane and apply from the next
//! request on, without a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use signpost_certs::{ALPN_H2, Identity};
use signpost_control_plane::client::Client as ControlPlane;
use signpost_control_plane::model::{MtlsMode, ServiceConfig, ServiceName};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::body::{self, ProxyBody};
use crate::deadline::{Timers, deadline_of};
use crate::error::{Caller as CallerKind, NOT_FORWARDED_HEADER, ProxyError};
use crate::headers::{
    Head, Known, MAX_HEADER_BYTES, innermost, restore_upgrade, strip_hop_by_hop_and,
    upgrade_protocol,
};
use crate::metrics::{Direction, Metrics, RequestMetrics};
use crate::serve::{self, Closing, Upgrades};
use crate::tls::{ALPN_TCP, MeshSlot};
use crate::transport::app::{AppClient, AppH2Client, AppProtocol};
use crate::transport::h2_server;

/// Header telling the app which mesh service called it. Set only from a
/// verified certificate; a copy arriving from outside is removed.
pub const CALLER_HEADER: http::HeaderName = http::HeaderName::from_static("x-signpost-caller");

/// How long a new connection may take to send its first byte or finish its
/// handshake: idle half-open connections must not pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS record type of a handshake, the first byte of every ClientHello.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// A peer as its certificate names it, with the `x-signpost-caller` value
/// the app is told: made once per connection and shared by its requests,
/// which clone an `Arc` rather than the [`Identity`] (two allocations).
#[derive(Debug)]
pub struct Caller {
    identity: Identity,
    header: Option<HeaderValue>,
}

impl Caller {
    /// The caller proven by a connection's client certificate.
    pub fn new(identity: Identity) -> Arc<Self> {
        let header = HeaderValue::from_str(identity.service()).ok();
        Arc::new(Self { identity, header })
    }
}

/// Decides whether a caller may call `service` under `config`.
///
/// `caller` is the identity proven by a client certificate; `None` for a
/// plain connection or TLS without a certificate.
pub fn authorize(
    config: &ServiceConfig,
    service: &ServiceName,
    caller: Option<&Identity>,
) -> Result<(), ProxyError> {
    let allowed = || {
        let names: Vec<&str> = config.allow.iter().map(|s| s.as_str()).collect();
        names.join(", ")
    };
    match caller {
        None if config.mtls == MtlsMode::Strict => Err(ProxyError::Forbidden {
            caller: "a caller without a mesh certificate".into(),
            service: service.to_string(),
            why: format!(
                "{service} requires mutual TLS (mtls: strict): call it through a Signpost sidecar"
            ),
        }),
        None if !config.allow.is_empty() => Err(ProxyError::Forbidden {
            caller: "a caller without a mesh identity".into(),
            service: service.to_string(),
            why: format!("only these services may call {service}: {}", allowed()),
        }),
        None => Ok(()),
        Some(id) => {
            if config.allow.is_empty() || config.allow.iter().any(|a| a.as_str() == id.service()) {
                Ok(())
            } else {
                Err(ProxyError::Forbidden {
                    caller: id.service().to_string(),
                    service: service.to_string(),
                    why: format!(
                        "{} is not in the allow-list of {service}: {}",
                        id.uri(),
                        allowed()
                    ),
                })
            }
        }
    }
}

/// Settings of the inbound side.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// This service.
    pub service: ServiceName,
    /// This sidecar's id, for the loop guard.
    pub id: String,
    /// The local app.
    pub app: SocketAddr,
    /// Limit for the app's response headers, from the end of the request
    /// body.
    pub request_timeout: Duration,
    /// Which protocol the app is spoken to in.
    pub app_protocol: AppProtocol,
}

impl InboundConfig {
    /// Settings with the sidecar's defaults but for the names.
    pub fn new(service: ServiceName, id: impl Into<String>, app: SocketAddr) -> Self {
        Self {
            service,
            id: id.into(),
            app,
            request_timeout: Duration::from_secs(30),
            app_protocol: AppProtocol::Auto,
        }
    }
}

/// The inbound proxy.
pub struct Inbound {
    config: InboundConfig,
    policy: Arc<ArcSwap<ServiceConfig>>,
    tls: Option<MeshSlot>,
    app: AppClient,
    app_h2: AppH2Client,
    requests: RequestMetrics,
    /// The request timeouts' timers.
    timers: Arc<Timers>,
    /// WebSockets in progress.
    upgrades: Upgrades,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Inbound {
    /// An inbound proxy. Without `tls` it serves plain connections only
    /// (for tests; every caller is then unidentified); with it, until the
    /// slot holds a certificate, TLS connections are closed at once and
    /// plain requests answered 503 "no certificate yet".
    pub fn new(
        config: InboundConfig,
        policy: Arc<ArcSwap<ServiceConfig>>,
        tls: Option<MeshSlot>,
        metrics: Metrics,
    ) -> Arc<Self> {
        let app = AppClient::new(config.app, Duration::from_secs(1));
        let app_h2 = AppH2Client::new(config.app, Duration::from_secs(1));
        let requests = metrics.requests_of(Direction::Inbound, config.service.as_str());
        Arc::new(Self {
            config,
            policy,
            tls,
            app,
            app_h2,
            requests,
            timers: Timers::new(),
            upgrades: Upgrades::new(),
        })
    }

    /// WebSockets open now.
    pub fn upgraded_connections(&self) -> usize {
        self.upgrades.len()
    }

    /// Serves peers on `listener` until `stop`, then drains.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
        drain: Duration,
    ) {
        let upgrades = self.upgrades.clone();
        let stopped = stop.clone();
        let connections = serve::accept_loop(
            "inbound",
            listener,
            stop,
            drain,
            move |stream, peer, closing| {
                let this = self.clone();
                async move { this.connection(stream, closing).await }
                    .instrument(info_span!("inbound_conn", peer = %peer))
            },
        );
        tokio::join!(connections, async move {
            stopped.cancelled().await;
            upgrades.shutdown(drain).await;
        });
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, closing: Closing) {
        let mut first = [0u8; 1];
        let peeked = tokio::select! {
            peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)) => peeked,
            // Draining: a connection that has sent nothing yet is closed
            // now rather than waited for.
            () = closing.requested() => return,
        };
        match peeked {
            Ok(Ok(1)) => {}
            Ok(Ok(_)) | Err(_) => return,
            Ok(Err(err)) => {
                debug!(%err, "connection failed before its first byte");
                return;
            }
        }
        if first[0] != TLS_HANDSHAKE {
            debug!("plain connection");
            let this = self.clone();
            serve::serve_http(stream, closing, move |req: Request<Incoming>| {
                let this = this.clone();
                async move { this.handle(req.map(body::boxed), None).await }
            })
            .await;
            return;
        }
        let Some(tls) = self.tls.as_ref().and_then(MeshSlot::get) else {
            // Nothing to answer a handshake with: closed at once, so the
            // caller's sidecar tries another instance.
            debug!("TLS connection but this inbound has no certificate yet");
            return;
        };
        let tls = match tls.inbound() {
            Ok(tls) => tls,
            Err(err) => {
                warn!(%err, "cannot serve mesh TLS");
                return;
            }
        };
        let acceptor = match self.policy.load().mtls {
            MtlsMode::Strict => tls.strict(),
            MtlsMode::Permissive => tls.permissive(),
        };
        let Some(acceptor) = acceptor else {
            debug!("TLS connection but no acceptor is configured");
            return;
        };
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(err)) => {
                let reason = signpost_certs::classify_io(&err);
                tls.handshake_failure(reason.as_str());
                info!(%reason, %err, "TLS handshake refused");
                return;
            }
            Err(_) => {
                tls.handshake_failure("timeout");
                return;
            }
        };
        let (_, conn) = stream.get_ref();
        let caller = signpost_certs::peer_identity(conn).ok().map(Caller::new);
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let span = info_span!(
            "mtls",
            caller = caller
                .as_ref()
                .map(|c| c.identity.service().to_string())
                .unwrap_or_else(|| "-".into())
        );
        match alpn.as_deref() {
            Some(ALPN_TCP) => self.tunnel(stream, caller).instrument(span).await,
            // What peer sidecars speak.
            Some(ALPN_H2) => {
                h2_server::serve(stream, closing, |req| self.handle(req, caller.clone()))
                    .instrument(span)
                    .await
            }
            _ => {
                let this = self.clone();
                serve::serve_http(stream, closing, move |req: Request<Incoming>| {
                    let this = this.clone();
                    let caller = caller.clone();
                    async move { this.handle(req.map(body::boxed), caller).await }
                })
                .instrument(span)
                .await;
            }
        }
    }

    async fn tunnel(
        &self,
        mut stream: tokio_rustls::server::TlsStream<TcpStream>,
        caller: Option<Arc<Caller>>,
    ) {
        let policy = self.policy.load_full();
        let identity = caller.as_ref().map(|c| &c.identity);
        if let Err(err) = authorize(&policy, &self.config.service, identity) {
            warn!(error = %err, "tunnel refused");
            return;
        }
        let mut app = match TcpStream::connect(self.config.app).await {
            Ok(s) => s,
            Err(err) => {
                warn!(app = %self.config.app, %err, "tunnel: app unreachable");
                return;
            }
        };
        match tokio::io::copy_bidirectional(&mut stream, &mut app).await {
            Ok((up, down)) => debug!(up, down, "tunnel closed"),
            Err(err) => debug!(%err, "tunnel ended with an error"),
        }
    }

    /// Handles one request from a peer (`caller` from its certificate).
    pub async fn handle(
        &self,
        req: Request<ProxyBody>,
        caller: Option<Arc<Caller>>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let span = info_span!(
            "inbound",
            method = %req.method(),
            path = %req.uri().path(),
            caller = caller.as_ref().map(|c| c.identity.service().to_string()).unwrap_or_else(|| "-".into())
        );
        let head = Head::of(req.headers());
        let kind = head.caller();
        let rsp = match self.forward(req, caller, &head).instrument(span).await {
            Ok(rsp) => rsp,
            Err(err) => {
                info!(error = %err, "refused");
                let reached_app = err.reached_app();
                let mut rsp = err.respond(kind);
                if !reached_app {
                    rsp.headers_mut()
                        .insert(NOT_FORWARDED_HEADER, HeaderValue::from_static("1"));
                }
                rsp
            }
        };
        self.requests
            .record(rsp.status().as_u16(), started.elapsed());
        match kind {
            CallerKind::Grpc => self.requests.observe_grpc(rsp),
            CallerKind::Http => rsp,
        }
    }

    async fn forward(
        &self,
        mut req: Request<ProxyBody>,
        caller: Option<Arc<Caller>>,
        head: &Head,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // No hop check here: this sidecar's own outbound marks the requests
        // it sends, and an app may legitimately call its own service. The
        // loop an inbound could cause (`--app` pointing back at the sidecar)
        // is refused at start-up instead.
        if let Some(reason) = self.tls.as_ref().and_then(MeshSlot::not_ready) {
            return Err(ProxyError::NoCertificate { reason });
        }
        let identity = caller.as_ref().map(|c| &c.identity);
        authorize(&self.policy.load(), &self.config.service, identity)?;
        if head.size > MAX_HEADER_BYTES {
            return Err(ProxyError::HeadersTooLarge {
                size: head.size,
                limit: MAX_HEADER_BYTES,
            });
        }
        let upgrade = match req.version() {
            Version::HTTP_11 if head.may_upgrade() => upgrade_protocol(req.headers()),
            _ => None,
        };
        let downstream = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let sent_as_http2 = head.has(Known::OrigProto);
        let http2 = upgrade.is_none()
            && match self.config.app_protocol {
                AppProtocol::Http1 => false,
                AppProtocol::Http2 => true,
                AppProtocol::Auto => req.version() == Version::HTTP_2 && sent_as_http2,
            };
        let (mut parts, body) = req.into_parts();
        // Only this sidecar vouches for callers; and the hop list is the
        // mesh's business, not the app's (an app that copies all incoming
        // headers to its own calls would otherwise trip the loop guard).
        strip_hop_by_hop_and(
            &mut parts.headers,
            head,
            &[Known::Caller, Known::Hop, Known::OrigProto],
        );
        if let Some(protocol) = &upgrade {
            restore_upgrade(&mut parts.headers, protocol.clone());
        }
        if let Some(v) = caller.as_ref().and_then(|c| c.header.clone()) {
            parts.headers.insert(CALLER_HEADER, v);
        }
        let deadline = deadline_of(head.grpc_timeout, self.config.request_timeout);
        let (body, ended) = if body.is_end_stream() {
            (body, None)
        } else {
            let (body, ended) = body::watch(body, None);
            (body, Some(ended))
        };
        let service = || self.config.service.to_string();
        let app = self.config.app;
        let unavailable = |reason: String| ProxyError::AppUnavailable {
            service: service(),
            app,
            reason,
        };
        let broke_off = |reason: String| ProxyError::BadGateway {
            service: service(),
            reason: format!("app at {app}: {reason}"),
        };
        let timed_out = |_| ProxyError::Timeout {
            service: service(),
            after: deadline.after,
        };
        let rsp = if http2 {
            let req = self.app_h2.request_from(parts, body);
            let call = Box::pin(self.app_h2.request(req));
            self.timers
                .timed(call, ended, deadline)
                .await
                .map_err(timed_out)?
                // Not sent: answered 503 so that callers retry elsewhere
                // (see `ProxyError::status`).
                .map_err(|e| {
                    if e.is_connect() {
                        unavailable(innermost(&e))
                    } else {
                        broke_off(format!(
                            "{} (HTTP/2, the caller's protocol: an app that speaks only \
                             HTTP/1.1 needs --app-protocol http1)",
                            innermost(&e)
                        ))
                    }
                })?
                .map(body::boxed)
        } else {
            self.set_host(&mut parts);
            // Origin form (`/path?query`), as HTTP/1.1 sends to a server.
            parts.uri = match parts.uri.path_and_query() {
                Some(path) if path.as_str().starts_with('/') || path.as_str() == "*" => {
                    Uri::from(path.clone())
                }
                _ => Uri::from_static("/"),
            };
            parts.version = Version::HTTP_11;
            let req = Request::from_parts(parts, body);
            let result = if upgrade.is_some() {
                let call = Box::pin(crate::transport::app::upgrade(
                    app,
                    Duration::from_secs(1),
                    req,
                ));
                self.timers.timed(call, ended, deadline).await
            } else {
                let call = Box::pin(self.app.request(req));
                self.timers
                    .timed(call, ended, deadline)
                    .await
                    .map(|r| r.map(|rsp| rsp.map(body::boxed)))
            };
            result.map_err(timed_out)?.map_err(|e| {
                if e.is_connect() {
                    unavailable(innermost(&e))
                } else {
                    broke_off(innermost(&e))
                }
            })?
        };
        let mut rsp = rsp;
        let answered = Head::of(rsp.headers());
        strip_hop_by_hop_and(rsp.headers_mut(), &answered, &[Known::NotForwarded]);
        if let (Some(protocol), Some(downstream)) = (upgrade, downstream)
            && rsp.status() == http::StatusCode::SWITCHING_PROTOCOLS
        {
            restore_upgrade(rsp.headers_mut(), protocol);
            let upstream = hyper::upgrade::on(&mut rsp);
            self.upgrades.spawn(async move {
                match tokio::try_join!(downstream, upstream) {
                    Ok((peer, app)) => {
                        serve::splice(
                            hyper_util::rt::TokioIo::new(peer),
                            hyper_util::rt::TokioIo::new(app),
                        )
                        .await
                    }
                    Err(err) => debug!(%err, "upgrade failed"),
                }
            });
        }
        Ok(rsp)
    }

    /// Gives an HTTP/1.1 request the `Host` its caller named.
    fn set_host(&self, parts: &mut http::request::Parts) {
        if parts.headers.contains_key(header::HOST) {
            return;
        }
        let host = match parts.uri.authority() {
            Some(a) => HeaderValue::from_str(a.as_str()),
            None => HeaderValue::from_str(&self.config.app.to_string()),
        };
        if let Ok(v) = host {
            parts.headers.insert(header::HOST, v);
        }
    }
}

/// Keeps `policy` equal to the service's config on the control plane with
/// blocking queries, until `cancel`. Errors keep the last config.
pub async fn watch_service_config(
    client: ControlPlane,
    service: ServiceName,
    policy: Arc<ArcSwap<ServiceConfig>>,
    cancel: CancellationToken,
) {
    let mut index = None;
    loop {
        let query = client.service(&service, index, Duration::from_secs(30));
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            r = query => r,
        };
        match result {
            Ok(view) => {
                let config = view.config.unwrap_or_default();
                if **policy.load() != config {
                    info!(allow = ?config.allow, mtls = ?config.mtls, "service config changed");
                    policy.store(Arc::new(config));
                }
                // An index going backwards means the store was reset: start over.
                index = match index {
                    Some(i) if view.index < i => None,
                    _ => Some(view.index),
                };
            }
            Err(err) => {
                debug!(%err, "service config query failed; keeping the last config");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    fn id(s: &str) -> Identity {
        Identity::new(s, "xingren.host").unwrap()
    }

    #[tokio::test]
    async fn draining_does_not_wait_for_a_connection_that_sent_nothing() {
        let config = InboundConfig {
            service: name("user"),
            id: "u1".into(),
            app: "127.0.0.1:9".parse().unwrap(),
            request_timeout: Duration::from_secs(5),
            app_protocol: AppProtocol::Auto,
        };
        let policy = Arc::new(ArcSwap::from_pointee(ServiceConfig::default()));
        let inbound = Inbound::new(config, policy, None, Metrics::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let served = tokio::spawn(inbound.serve(listener, stop.clone(), Duration::from_secs(10)));
        let _idle = TcpStream::connect(addr).await.unwrap();
        // Let the connection be accepted and wait for its first byte.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        stop.cancel();
        served.await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "drain waited {:?} for a connection that sent nothing",
            started.elapsed()
        );
    }

    #[test]
    fn allow_list_decides() {
        let user = name("user");
        let open = ServiceConfig::default();
        assert!(authorize(&open, &user, Some(&id("order"))).is_ok());
        assert!(
            authorize(&open, &user, None).is_ok(),
            "permissive takes plain callers"
        );

        let closed = ServiceConfig {
            allow: vec![name("billing")],
            mtls: MtlsMode::Permissive,
        };
        let err = authorize(&closed, &user, Some(&id("order"))).unwrap_err();
        assert_eq!(err.to_string(), "order is not allowed to call user");
        assert_eq!(err.status(), 403);
        assert!(authorize(&closed, &user, Some(&id("billing"))).is_ok());
        assert!(authorize(&closed, &user, None).is_err());

        let strict = ServiceConfig {
            allow: vec![],
            mtls: MtlsMode::Strict,
        };
        assert!(authorize(&strict, &user, None).is_err());
        assert!(authorize(&strict, &user, Some(&id("order"))).is_ok());
    }
}
