//! One pooled HTTP/2 connection per peer sidecar.
//!
//! Every request to an endpoint is multiplexed over a single HTTP/2
//! connection (over mesh TLS in production, plain in some tests), opened on
//! first use and again after it closes. Connecting is bounded by the
//! connect timeout. The service is always ready: readiness belongs to
//! outlier ejection and the balancer, and a connection attempt per request
//! at worst costs one connect timeout. A failed connection, or one the peer
//! closes, asks discovery to resolve again (see
//! [`crate::discovery::Refresh`]): a peer that hangs up or is not listening
//! has most likely left, and DNS may already know.
//!
//! The HTTP/2 itself is [`crate::transport`]'s: this module decides when
//! to connect and what a failure means for retries and discovery.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;
use tower::Service;
use tracing::{debug, debug_span};

use crate::body::{BoxError, ProxyBody};
use crate::discovery::Refresh;
use crate::transport::h2_client::Connection;

/// A byte stream to a peer.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxedIo = Box<dyn Io>;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Why a connection to a peer could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed (refused, unreachable).
    #[error("{}", describe_tcp(*addr, source))]
    Tcp {
        /// The peer.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The peer did not accept the connection in time.
    #[error("no connection to {addr} within {timeout:?}")]
    Timeout {
        /// The peer.
        addr: SocketAddr,
        /// The connect timeout.
        timeout: Duration,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with {addr} failed ({reason}): {source}")]
    Tls {
        /// The peer.
        addr: SocketAddr,
        /// The failure class, as the metric label.
        reason: &'static str,
        /// The handshake error.
        source: std::io::Error,
    },
    /// HTTP/2 could not be set up over the connection.
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    Http {
        /// The peer.
        addr: SocketAddr,
        /// The HTTP/2 error.
        source: h2::Error,
    },
}

fn describe_tcp(addr: SocketAddr, source: &std::io::Error) -> String {
    if source.kind() == std::io::ErrorKind::ConnectionRefused {
        format!("connection refused by {addr}")
    } else {
        format!("cannot connect to {addr}: {source}")
    }
}

/// Opens byte streams to peers: plain TCP, or mesh TLS for one identity.
pub trait Connect: Send + Sync + 'static {
    /// Connects to `addr`.
    fn connect(&self, addr: SocketAddr) -> BoxFuture<Result<BoxedIo, ConnectError>>;
}

/// Plain TCP: for tests, and for peers reached without mesh TLS.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnect;

impl Connect for TcpConnect {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<Result<BoxedIo, ConnectError>> {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|source| ConnectError::Tcp { addr, source })?;
            // Requests are small and latency-bound; do not wait to coalesce.
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as BoxedIo)
        })
    }
}

/// Why a request to an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// No connection could be made; the request was not sent.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The peer refused the request unprocessed: `REFUSED_STREAM`, a
    /// graceful GOAWAY below its stream id (RFC 9113 §8.7), or the
    /// connection failed before the request was written.
    #[error("{addr} refused the request before processing it: {reason}")]
    Refused {
        /// The peer.
        addr: SocketAddr,
        /// What HTTP/2 said.
        reason: String,
    },
    /// The exchange broke off after the request was sent: the peer may
    /// have processed it.
    #[error(
        "{addr} broke off the request after it was sent ({source}); it may have been processed"
    )]
    Reset {
        /// The peer.
        addr: SocketAddr,
        /// The error (a reset stream, a closed connection).
        source: BoxError,
    },
}

impl EndpointError {
    /// Whether the request certainly did not reach the peer's app.
    pub fn is_unprocessed(&self) -> bool {
        matches!(
            self,
            EndpointError::Connect(_) | EndpointError::Refused { .. }
        )
    }

    /// The error of a request to `addr` that HTTP/2 failed with `err`.
    /// `written` says whether the request had been handed to the
    /// connection (before that, nothing left).
    pub fn from_h2(addr: SocketAddr, err: h2::Error, written: bool) -> Self {
        let refused = err.reason() == Some(h2::Reason::REFUSED_STREAM) && err.is_remote();
        // h2 fails the streams above a GOAWAY's last stream id with the
        // GOAWAY itself; a graceful one (NO_ERROR) fails nothing else. An
        // error GOAWAY also fails the streams below, which may have run.
        let above_goaway =
            err.is_go_away() && err.is_remote() && err.reason() == Some(h2::Reason::NO_ERROR);
        if !written || refused || above_goaway {
            EndpointError::Refused {
                addr,
                reason: err.to_string(),
            }
        } else {
            EndpointError::Reset {
                addr,
                source: Box::new(err),
            }
        }
    }
}

/// Finds an [`EndpointError`] in an error's chain.
pub fn find_endpoint_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a EndpointError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<EndpointError>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// What a connection to a peer sidecar carries, as its ALPN names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerProtocol {
    /// HTTP/2: the pooled connection every request shares.
    Http2,
    /// HTTP/1.1: a connection of its own for one Upgrade (WebSocket).
    Http1,
    /// Opaque bytes ([`crate::tls::ALPN_TCP`]): a TCP tunnel.
    Tcp,
}

/// A request extension marking an HTTP/1.1 Upgrade (WebSocket and the
/// like): it goes to the peer on a connection of its own, which becomes
/// the upgraded byte stream after `101 Switching Protocols`.
#[derive(Debug, Clone, Copy)]
pub struct UpgradeRequest;

/// The service of one endpoint: requests over its pooled HTTP/2 connection.
#[derive(Clone)]
pub struct PeerConnection {
    addr: SocketAddr,
    connector: Arc<dyn Connect>,
    connect_timeout: Duration,
    refresh: Option<Refresh>,
    /// Connects for upgrades (HTTP/1.1 ALPN); without it they are refused.
    upgrades: Option<Arc<dyn Connect>>,
    live: Arc<std::sync::Mutex<Option<Connection>>>,
    /// Held while connecting: requests arriving meanwhile wait for that
    /// connection rather than opening their own.
    connecting: Arc<Mutex<()>>,
}

impl std::fmt::Debug for PeerConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConnection")
            .field("addr", &self.addr)
            .finish()
    }
}

impl PeerConnection {
    /// A connection to `addr`, opened on first use through `connector`.
    pub fn new(addr: SocketAddr, connector: Arc<dyn Connect>, connect_timeout: Duration) -> Self {
        Self {
            addr,
            connector,
            connect_timeout,
            refresh: None,
            upgrades: None,
            live: Arc::default(),
            connecting: Arc::default(),
        }
    }

    /// Asks `refresh` for a new DNS answer whenever a connection fails.
    pub fn with_refresh(mut self, refresh: Refresh) -> Self {
        self.refresh = Some(refresh);
        self
    }

    /// Sends upgrade requests on connections of their own, made by
    /// `connector`.
    pub fn with_upgrades(mut self, connector: Arc<dyn Connect>) -> Self {
        self.upgrades = Some(connector);
        self
    }

    /// Sends an upgrade request on a new HTTP/1.1 connection; the response
    /// carries the upgrade ([`hyper::upgrade::on`]).
    ///
    /// A connection of its own rather than an extended CONNECT stream on
    /// the pooled HTTP/2 connection (RFC 8441): an upgraded connection
    /// lives long and moves bytes at its own pace, and on a stream of its
    /// own it neither shares the pooled connection's flow-control window
    /// nor dies with it; the cost, one handshake per upgrade, is paid once
    /// per long-lived connection.
    async fn upgrade(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<ProxyBody>, EndpointError> {
        let addr = self.addr;
        let Some(connector) = &self.upgrades else {
            return Err(EndpointError::Refused {
                addr,
                reason: "upgrades are not carried to this destination".into(),
            });
        };
        let io = tokio::time::timeout(self.connect_timeout, connector.connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout {
                addr,
                timeout: self.connect_timeout,
            })??;
        let mut send = crate::transport::http1::handshake(io, debug_span!("upgrade", peer = %addr))
            .await
            .map_err(|e| EndpointError::Refused {
                addr,
                reason: e.to_string(),
            })?;
        let rsp = send
            .send_request(req)
            .await
            .map_err(|e| EndpointError::Reset {
                addr,
                source: Box::new(e),
            })?;
        Ok(rsp.map(crate::body::boxed))
    }

    /// The open connection, if there is one.
    fn current(&self) -> Option<Connection> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.as_ref().filter(|l| !l.is_closed()).cloned()
    }

    async fn sender(&self) -> Result<Connection, ConnectError> {
        if let Some(live) = self.current() {
            return Ok(live);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(live) = self.current() {
            return Ok(live);
        }
        let addr = self.addr;
        let io = tokio::time::timeout(self.connect_timeout, self.connector.connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout {
                addr,
                timeout: self.connect_timeout,
            })??;
        let refresh = self.refresh.clone();
        let in_use = Arc::downgrade(&self.live);
        let closed = move || {
            // The peer closed a connection we still use: a sidecar sends
            // GOAWAY when it stops accepting, after leaving DNS, so the
            // next answer likely names its replacement. (When the endpoint
            // was dropped, nobody uses it: no question.)
            if in_use.strong_count() > 0
                && let Some(refresh) = refresh
            {
                debug!("peer closed the connection; asking DNS again");
                refresh.request();
            }
        };
        let live = Connection::handshake(io, addr, closed)
            .await
            .map_err(|source| ConnectError::Http { addr, source })?;
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(live.clone());
        Ok(live)
    }
}

impl Service<http::Request<ProxyBody>> for PeerConnection {
    type Response = http::Response<ProxyBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<ProxyBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if req.extensions().get::<UpgradeRequest>().is_some() {
                return Ok(this.upgrade(req).await?);
            }
            let live = match this.sender().await {
                Ok(live) => live,
                Err(err) => {
                    if let Some(refresh) = &this.refresh {
                        refresh.request();
                    }
                    return Err(EndpointError::from(err).into());
                }
            };
            let addr = this.addr;
            live.send(addr, req)
                .await
                .map_err(|e| EndpointError::from_h2(addr, e.source, e.written).into())
        })
    }
}

#[cfg(test)]
mod tests {
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::*;

    /// A connector whose connections never complete.
    struct Hang;
    impl Connect for Hang {
        fn connect(&self, _: SocketAddr) -> BoxFuture<Result<BoxedIo, ConnectError>> {
            Box::pin(futures::future::pending())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connect_times_out() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut conn = PeerConnection::new(addr, Arc::new(Hang), Duration::from_secs(1));
        let started = tokio::time::Instant::now();
        let err = conn
            .call(http::Request::new(crate::body::empty()))
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        let err = find_endpoint_error(&*err).unwrap();
        assert!(matches!(
            err,
            EndpointError::Connect(ConnectError::Timeout { .. })
        ));
        assert!(err.is_unprocessed());
    }

    /// A connector refusing every connection, as a stopped peer does.
    struct Refused;
    impl Connect for Refused {
        fn connect(&self, addr: SocketAddr) -> BoxFuture<Result<BoxedIo, ConnectError>> {
            Box::pin(async move {
                Err(ConnectError::Tcp {
                    addr,
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connection_asks_discovery_to_resolve_again() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let refresh = Refresh::new();
        let mut conn = PeerConnection::new(addr, Arc::new(Refused), Duration::from_secs(1))
            .with_refresh(refresh.clone());
        assert!(!refresh.take_request(), "nothing asked yet");
        let err = conn
            .call(http::Request::new(crate::body::empty()))
            .await
            .unwrap_err();
        assert!(find_endpoint_error(&*err).unwrap().is_unprocessed());
        assert!(
            refresh.take_request(),
            "the failed connection must ask for a new DNS answer"
        );
    }

    /// Serves HTTP/2 on a loopback port; each connection answers 200 until
    /// `stop` fires, then closes gracefully (GOAWAY), as a sidecar's inbound
    /// does when it stops accepting.
    async fn h2_server(stop: tokio_util::sync::CancellationToken) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(crate::body::empty()))
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_connection_the_peer_closes_asks_discovery_to_resolve_again() {
        let stop = tokio_util::sync::CancellationToken::new();
        let addr = h2_server(stop.clone()).await;
        let refresh = Refresh::new();
        let mut conn = PeerConnection::new(addr, Arc::new(TcpConnect), Duration::from_secs(1))
            .with_refresh(refresh.clone());
        let rsp = conn
            .call(http::Request::new(crate::body::empty()))
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        assert!(!refresh.take_request(), "a working connection asks nothing");
        stop.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !refresh.take_request() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the peer's GOAWAY did not ask for a new DNS answer"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn dropping_an_endpoint_asks_nothing() {
        let addr = h2_server(tokio_util::sync::CancellationToken::new()).await;
        let refresh = Refresh::new();
        let mut conn = PeerConnection::new(addr, Arc::new(TcpConnect), Duration::from_secs(1))
            .with_refresh(refresh.clone());
        conn.call(http::Request::new(crate::body::empty()))
            .await
            .unwrap();
        drop(conn);
        // Our side closes the connection; give its task time to end.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!refresh.take_request());
    }
}
