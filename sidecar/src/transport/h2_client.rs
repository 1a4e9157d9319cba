//! Requests to a peer sidecar over one HTTP/2 connection, on the `h2`
//! crate (see [`super`] for why not hyper's client).
//!
//! A task of its own drives the connection's I/O and keep-alive. A request
//! is sent, and its response awaited, in the task that read it from the
//! app; only a request body that is not already complete goes out in a
//! task of its own, beside the wait for the response (which may come
//! first: a peer refusing a large upload, say).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{Instrument, debug, debug_span};

use super::http2;
use crate::body::ProxyBody;
use crate::wake::OnWake;

/// An open connection to a peer: cloned by each request that uses it.
#[derive(Clone)]
pub(crate) struct Connection {
    send: h2::client::SendRequest<Bytes>,
    /// Set when the task driving the connection ended.
    closed: Arc<AtomicBool>,
}

/// Why a request got no response head.
#[derive(Debug)]
pub(crate) struct SendError {
    /// What HTTP/2 said.
    pub(crate) source: h2::Error,
    /// Whether the request had been handed to the connection (before
    /// that, nothing left for the peer).
    pub(crate) written: bool,
}

impl Connection {
    /// Sets up HTTP/2 over `io` (a connection to `addr`) and spawns the
    /// task that drives it; `on_close` runs in that task once the
    /// connection has closed (the peer closed it, it failed, its
    /// keep-alive went unanswered, or every handle was dropped).
    pub(crate) async fn handshake<I>(
        io: I,
        addr: SocketAddr,
        on_close: impl FnOnce() + Send + 'static,
    ) -> Result<Self, h2::Error>
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (send, mut conn) = http2::client_builder().handshake::<_, Bytes>(io).await?;
        let ping = conn.ping_pong();
        let closed = Arc::new(AtomicBool::new(false));
        let this = Self {
            send,
            closed: closed.clone(),
        };
        tokio::spawn(
            async move {
                let mut conn = http2::Batched::new(&mut conn);
                tokio::select! {
                    biased;
                    result = &mut conn => if let Err(err) = result {
                        debug!(%err, "connection closed");
                    },
                    // Polled only when its timer or ping fires.
                    err = OnWake::new(http2::keepalive(ping)) => {
                        debug!(%err, "closing the connection");
                    }
                }
                closed.store(true, Ordering::Release);
                on_close();
            }
            .instrument(debug_span!("peer", peer = %addr)),
        );
        Ok(this)
    }

    /// Whether the connection has closed: the next request needs another.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` (to `addr`, for the logs) and awaits the response head.
    pub(crate) async fn send(
        self,
        addr: SocketAddr,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<ProxyBody>, SendError> {
        let unsent = |source| SendError {
            source,
            written: false,
        };
        // Waits while the peer's limit of concurrent streams is reached.
        let mut send = self.send.ready().await.map_err(unsent)?;
        let (parts, body) = req.into_parts();
        let mut head = http::Request::from_parts(parts, ());
        if let Some(len) = body.size_hint().exact()
            && (len != 0 || method_has_body(head.method()))
        {
            head.headers_mut()
                .entry(http::header::CONTENT_LENGTH)
                .or_insert_with(|| http::HeaderValue::from(len));
        }
        let end = body.is_end_stream();
        let (rsp, mut stream) = send.send_request(head, end).map_err(unsent)?;
        if !end {
            // The body goes out beside the wait for the response, which
            // may come first (a peer refusing a large upload, say).
            tokio::spawn(
                async move {
                    if let Err(err) = http2::send_body(body, &mut stream).await {
                        debug!(%err, "request body not sent whole");
                    }
                }
                .instrument(debug_span!("request_body", peer = %addr)),
            );
        }
        let rsp = rsp.await.map_err(|source| SendError {
            source,
            written: true,
        })?;
        let (parts, recv) = rsp.into_parts();
        let body = http2::boxed(recv, &parts.headers);
        Ok(http::Response::from_parts(parts, body))
    }
}

/// Whether a request with this method carries a body by definition, so an
/// empty one gets `content-length: 0` (RFC 9110 §8.6).
fn method_has_body(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    )
}
