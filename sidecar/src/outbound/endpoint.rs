//! One pooled HTTP/2 connection per peer sidecar.
//!
//! Every request to an endpoint is multiplexed over a single HTTP/2
//! connection (over mesh TLS in production, plain in some tests), opened on
//! first use and again after it closes. Connecting is bounded by the
//! connect timeout. The service is always ready: readiness belongs to
//! outlier ejection and the balancer, and a connection attempt per request
//! at worst costs one connect timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;
use tower::Service;
use tracing::{Instrument, debug, debug_span};

use crate::body::{BoxError, ProxyBody};

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
        /// hyper's error.
        source: hyper::Error,
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
    /// The connection failed before a response came (reset, closed).
    #[error("{addr} reset the request: {source}")]
    Reset {
        /// The peer.
        addr: SocketAddr,
        /// hyper's error.
        source: hyper::Error,
    },
}

impl EndpointError {
    /// Whether the request certainly did not reach the peer's app.
    pub fn is_connect(&self) -> bool {
        matches!(self, EndpointError::Connect(_))
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

type Sender = http2::SendRequest<ProxyBody>;

/// The service of one endpoint: requests over its pooled HTTP/2 connection.
#[derive(Clone)]
pub struct PeerConnection {
    addr: SocketAddr,
    connector: Arc<dyn Connect>,
    connect_timeout: Duration,
    sender: Arc<Mutex<Option<Sender>>>,
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
            sender: Arc::default(),
        }
    }

    async fn sender(&self) -> Result<Sender, ConnectError> {
        // One connect at a time per peer: requests arriving meanwhile wait
        // for it rather than opening connections of their own.
        let mut slot = self.sender.lock().await;
        if let Some(sender) = slot.as_ref()
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let addr = self.addr;
        let io = tokio::time::timeout(self.connect_timeout, self.connector.connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout {
                addr,
                timeout: self.connect_timeout,
            })??;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Detect a peer that vanished without a FIN, so the next request
            // reconnects instead of waiting for the request timeout.
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ConnectError::Http { addr, source })?;
        tokio::spawn(
            async move {
                if let Err(err) = conn.await {
                    debug!(%err, "connection closed");
                }
            }
            .instrument(debug_span!("peer", peer = %addr)),
        );
        *slot = Some(sender.clone());
        Ok(sender)
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
            let mut sender = this.sender().await.map_err(EndpointError::from)?;
            let rsp = sender
                .send_request(req)
                .await
                .map_err(|source| EndpointError::Reset {
                    addr: this.addr,
                    source,
                })?;
            Ok(rsp.map(crate::body::boxed))
        })
    }
}

#[cfg(test)]
mod tests {
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
        assert!(err.is_connect());
    }
}
