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
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use signpost_certs::{ALPN_H2, Identity};
use signpost_control_plane::client::Client as ControlPlane;
use signpost_control_plane::model::{MtlsMode, ServiceConfig, ServiceName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::app::AppClient;
use crate::body::{self, ProxyBody};
use crate::deadline::Timers;
use crate::error::ProxyError;
use crate::http2;
use crate::metrics::{Direction, Metrics, RequestMetrics};
use crate::outbound::proxy::{HOP_HEADER, innermost, strip_hop_by_hop, strip_hop_by_hop_and};
use crate::serve::{self, Closing};
use crate::tls::{ALPN_TCP, InboundTls};
use crate::wake::OnWake;

/// Header telling the app which mesh service called it. Set only from a
/// verified certificate; a copy arriving from outside is removed.
pub const CALLER_HEADER: http::HeaderName = http::HeaderName::from_static("x-signpost-caller");

/// How long a new connection may take to send its first byte or finish its
/// handshake: idle half-open connections must not pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS record type of a handshake, the first byte of every ClientHello.
const TLS_HANDSHAKE: u8 = 0x16;

/// A peer as its certificate names it, with the `x-signpost-caller` value
/// the app is told: made once per connection and shared by its requests
/// (cloning an [`Identity`] per request cost two allocations).
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
    /// Limit for the app's response headers.
    pub request_timeout: Duration,
}

/// The inbound proxy.
pub struct Inbound {
    config: InboundConfig,
    policy: Arc<ArcSwap<ServiceConfig>>,
    tls: Option<InboundTls>,
    app: AppClient,
    requests: RequestMetrics,
    /// The request timeouts' timers.
    timers: Arc<Timers>,
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
    /// (for tests; every caller is then unidentified).
    pub fn new(
        config: InboundConfig,
        policy: Arc<ArcSwap<ServiceConfig>>,
        tls: Option<InboundTls>,
        metrics: Metrics,
    ) -> Arc<Self> {
        let app = AppClient::new(config.app, Duration::from_secs(1));
        let requests = metrics.requests_of(Direction::Inbound, config.service.as_str());
        Arc::new(Self {
            config,
            policy,
            tls,
            app,
            requests,
            timers: Timers::new(),
        })
    }

    /// Serves peers on `listener` until `stop`, then drains.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
        drain: Duration,
    ) {
        serve::accept_loop(
            "inbound",
            listener,
            stop,
            drain,
            move |stream, peer, closing| {
                let this = self.clone();
                async move { this.connection(stream, closing).await }
                    .instrument(info_span!("inbound_conn", peer = %peer))
            },
        )
        .await;
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
        let Some(tls) = &self.tls else {
            debug!("TLS connection but this inbound has no certificate");
            return;
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
                self.serve_h2(stream, caller, closing)
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

    /// Serves a peer sidecar's HTTP/2 connection. Its streams are served
    /// inside this task, not a task each (see [`crate::http2`]).
    async fn serve_h2<I>(&self, io: I, caller: Option<Arc<Caller>>, closing: Closing)
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let handshake = http2::server_builder().handshake::<_, Bytes>(io);
        let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(err)) => {
                debug!(%err, "HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                debug!("no HTTP/2 preface in time");
                return;
            }
        };
        // Both polled only when they fire, not at every pass.
        let keepalive = OnWake::new(http2::keepalive(conn.ping_pong()));
        tokio::pin!(keepalive);
        let close_requested = OnWake::new(closing.requested());
        tokio::pin!(close_requested);
        let mut goaway_sent = false;
        let mut streams = FuturesUnordered::new();
        // One pass: every answer the app finished goes into the
        // connection's buffers first, then the connection reads what came
        // in and writes everything queued at once. `Batched` lets the app
        // connections that are ready finish before the pass.
        let served = std::future::poll_fn(|cx| {
            loop {
                while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
                if !goaway_sent && close_requested.as_mut().poll(cx).is_ready() {
                    // GOAWAY: the peer opens no new streams here and moves
                    // to other endpoints; the ones in flight finish.
                    conn.graceful_shutdown();
                    goaway_sent = true;
                }
                if let Poll::Ready(err) = keepalive.as_mut().poll(cx) {
                    debug!(%err, "closing the connection");
                    return Poll::Ready(());
                }
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        // Boxed before the push: `push` moves what it is
                        // given three times, and this future is ~3 KB.
                        streams.push(Box::pin(self.serve_stream(req, respond, caller.clone())));
                    }
                    Poll::Ready(Some(Err(err))) => {
                        debug!(%err, "HTTP/2 connection failed");
                        return Poll::Ready(());
                    }
                    // Closed, and every stream answered.
                    Poll::Ready(None) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        });
        http2::Batched::new(served).await;
        // The connection is gone: answers still pending cannot be sent.
        // Dropping it fails their streams, and dropping them cancels their
        // requests to the app.
        drop(conn);
        drop(streams);
    }

    /// Serves one stream of a peer's HTTP/2 connection.
    async fn serve_stream(
        &self,
        req: Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        caller: Option<Arc<Caller>>,
    ) {
        let (parts, recv) = req.into_parts();
        let body = http2::boxed(recv, &parts.headers);
        let handled = self.handle(Request::from_parts(parts, body), caller);
        tokio::pin!(handled);
        // A caller that gives up resets the stream: stop waiting for the app.
        let rsp = tokio::select! {
            rsp = &mut handled => rsp,
            _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
                debug!("the caller reset the request");
                return;
            }
        };
        let (parts, body) = rsp.into_parts();
        let end = body.is_end_stream();
        let mut send = match respond.send_response(Response::from_parts(parts, ()), end) {
            Ok(send) => send,
            Err(err) => {
                debug!(%err, "response not sent");
                return;
            }
        };
        if !end && let Err(err) = http2::send_body(body, &mut send).await {
            debug!(%err, "response body not sent whole");
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
        let rsp = match self.forward(req, caller).instrument(span).await {
            Ok(rsp) => rsp,
            Err(err) => {
                info!(error = %err, "refused");
                err.into_response()
            }
        };
        self.requests
            .record(rsp.status().as_u16(), started.elapsed());
        rsp
    }

    async fn forward(
        &self,
        req: Request<ProxyBody>,
        caller: Option<Arc<Caller>>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // No hop check here: this sidecar's own outbound marks the requests
        // it sends, and an app may legitimately call its own service. The
        // loop an inbound could cause (`--app` pointing back at the sidecar)
        // is refused at start-up instead.
        let identity = caller.as_ref().map(|c| &c.identity);
        authorize(&self.policy.load(), &self.config.service, identity)?;
        let (mut parts, body) = req.into_parts();
        // Only this sidecar vouches for callers; and the hop list is the
        // mesh's business, not the app's (an app that copies all incoming
        // headers to its own calls would otherwise trip the loop guard).
        strip_hop_by_hop_and(&mut parts.headers, &[CALLER_HEADER, HOP_HEADER]);
        if let Some(v) = caller.as_ref().and_then(|c| c.header.clone()) {
            parts.headers.insert(CALLER_HEADER, v);
        }
        if !parts.headers.contains_key(header::HOST) {
            let host = match parts.uri.authority() {
                Some(a) => HeaderValue::from_str(a.as_str()),
                None => HeaderValue::from_str(&self.config.app.to_string()),
            };
            if let Ok(v) = host {
                parts.headers.insert(header::HOST, v);
            }
        }
        // Origin form (`/path?query`), as HTTP/1.1 sends to a server.
        parts.uri = match parts.uri.path_and_query() {
            Some(path) if path.as_str().starts_with('/') || path.as_str() == "*" => {
                Uri::from(path.clone())
            }
            _ => Uri::from_static("/"),
        };
        parts.version = Version::HTTP_11;
        let req = Request::from_parts(parts, body);
        let timeout = self.config.request_timeout;
        let service = || self.config.service.to_string();
        let app = self.config.app;
        let rsp = self
            .timers
            .timeout(timeout, self.app.request(req))
            .await
            .map_err(|_| ProxyError::Timeout {
                service: service(),
                after: timeout,
            })?
            .map_err(|e| {
                if e.is_connect() {
                    // Not sent: answered 503 so that callers retry elsewhere
                    // (see `ProxyError::status`).
                    ProxyError::AppUnavailable {
                        service: service(),
                        app,
                        reason: innermost(&e),
                    }
                } else {
                    ProxyError::BadGateway {
                        service: service(),
                        reason: format!("app at {app}: {}", innermost(&e)),
                    }
                }
            })?;
        let mut rsp = rsp.map(body::boxed);
        strip_hop_by_hop(rsp.headers_mut());
        Ok(rsp)
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
