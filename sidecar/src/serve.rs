//! Accept loops and HTTP serving shared by the inbound, outbound and admin
//! listeners, with graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::body::ProxyBody;
use crate::error::SidecarError;

/// Binds `addr` for `what`, with a message naming both on failure.
pub async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, SidecarError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SidecarError::Bind {
            what: what.to_string(),
            addr,
            source,
        })
}

/// Tells a served connection when to finish: once its listener stops, each
/// connection completes its in-flight requests and closes (GOAWAY for
/// HTTP/2, `Connection: close` for HTTP/1.1).
#[derive(Debug, Clone)]
pub struct Closing(CancellationToken);

impl Closing {
    /// Resolves when the connection should finish.
    pub async fn requested(&self) {
        self.0.cancelled().await;
    }
}

/// Accepts connections on `listener` until `stop` fires, handing each to
/// `handle` with a [`Closing`] signal; then signals every connection and
/// waits up to `drain` for them to finish.
pub async fn accept_loop<F, Fut>(
    what: &'static str,
    listener: TcpListener,
    stop: CancellationToken,
    drain: Duration,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr, Closing) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let closing = CancellationToken::new();
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of file descriptors and the like: back off a
                    // little instead of spinning.
                    warn!(listener = what, %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(handle(stream, peer, Closing(closing.clone())));
    }
    drop(listener);
    closing.cancel();
    connections.close();
    let open = connections.len();
    if open > 0 {
        info!(listener = what, open, "draining connections");
    }
    if tokio::time::timeout(drain, connections.wait())
        .await
        .is_err()
    {
        warn!(
            listener = what,
            "drain time over; closing remaining connections"
        );
    }
}

/// Serves HTTP/1.1 and HTTP/2 on `io` until the connection ends or
/// `closing` asks it to close (after finishing in-flight requests).
pub async fn serve_http<I, S, Fut>(io: I, closing: Closing, service: S)
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let fut = service(req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(10)));
    let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = closing.requested() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        debug!(%err, "connection ended with an error");
    }
}
