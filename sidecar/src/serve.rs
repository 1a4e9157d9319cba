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
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
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

/// Accepts connections on `listener` until `stop` fires, handing each to
/// `handle` with a graceful-shutdown watcher; then waits up to `drain` for
/// the watched connections to finish.
pub async fn accept_loop<F, Fut>(
    what: &'static str,
    listener: TcpListener,
    stop: CancellationToken,
    drain: Duration,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr, Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
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
        tokio::spawn(handle(stream, peer, graceful.watcher()));
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        info!(listener = what, open, "draining connections");
    }
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            listener = what,
            "drain time over; closing remaining connections"
        );
    }
}

/// Serves HTTP/1.1 and HTTP/2 on `io` until the connection ends or the
/// watcher asks it to close (after finishing in-flight requests).
pub async fn serve_http<I, S, Fut>(io: I, watcher: Watcher, service: S)
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
    if let Err(err) = watcher.watch(conn).await {
        debug!(%err, "connection ended with an error");
    }
}
