//! The HTTP/1 server both examples run on: accept, serve each connection
//! with hyper, log each request, and on shutdown stop accepting and let
//! in-flight requests finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::response::Body;

/// How long in-flight requests may take to finish after a shutdown signal.
/// 10 s: the same as the sidecar's drain, so an app never stops before its
/// sidecar has finished sending it requests.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's headers. Bounds what an
/// idle or slow client holds; hyper's own default once a timer is set.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// An example service: one request in, one response out.
///
/// Handlers see the request without its body: every route is a `GET`.
pub trait Handler: Send + Sync + 'static {
    /// Answers `req`. Never fails: errors are answered as JSON.
    fn handle(&self, req: Request<()>) -> impl Future<Output = http::Response<Body>> + Send;
}

/// Serves `handler` on `listener` until `shutdown` resolves, then stops
/// accepting and waits up to `drain` for open connections to finish their
/// in-flight requests (idle keep-alive connections are closed at once).
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let handler = Arc::new(handler);
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually out of file descriptors: back off instead of
                    // spinning, the condition tends to clear.
                    warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let handler = handler.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let handler = handler.clone();
            async move { Ok::<_, std::convert::Infallible>(handle_logged(&*handler, req).await) }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(
            async move {
                if let Err(err) = conn.await {
                    debug!(%err, "connection ended with an error");
                }
            }
            .instrument(info_span!("conn", %peer)),
        );
    }
    drop(listener);
    let open = graceful.count();
    info!(open, ?drain, "shutting down: no longer accepting; draining");
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("drain time over; closing remaining connections");
    }
    info!("stopped");
}

async fn handle_logged<H: Handler>(handler: &H, req: Request<Incoming>) -> http::Response<Body> {
    let started = tokio::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // No route reads a body; hyper discards whatever was sent.
    let rsp = handler.handle(req.map(|_| ())).await;
    info!(
        %method,
        %path,
        status = rsp.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    rsp
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(err) => {
                warn!(%err, "cannot watch SIGTERM; only Ctrl-C stops this process");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    info!("shutdown signal received");
}

/// Binds `addr`, with a message that names the address when it fails.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| std::io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::text;
    use http::StatusCode;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;

    /// Answers after a pause, to have a request in flight at shutdown.
    struct Slow(Duration);

    impl Handler for Slow {
        async fn handle(&self, _req: Request<()>) -> http::Response<Body> {
            tokio::time::sleep(self.0).await;
            text(StatusCode::OK, "done")
        }
    }

    #[tokio::test]
    async fn shutdown_lets_in_flight_requests_finish_and_refuses_new_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            Slow(Duration::from_millis(300)),
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));

        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        // Let the server read the request before it is told to stop.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stop.send(());

        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");

        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops after draining")
            .expect("server task");
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }
}
