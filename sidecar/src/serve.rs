//! Accept loops and HTTP serving shared by the inbound, outbound and admin
//! listeners, with graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::body::{BoxError, ProxyBody};
use crate::error::SidecarError;
use crate::wake::OnWake;

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

/// Upgraded connections (WebSocket, CONNECT tunnels) of one listener. They
/// outlive the HTTP exchange that made them, and no idle timer of the
/// connection applies to them any more, so the listener tracks them here:
/// on shutdown, those serving HTTP inside a tunnel are asked to finish,
/// and whatever is still open after the drain time is cut.
#[derive(Debug, Clone, Default)]
pub struct Upgrades {
    tracker: TaskTracker,
    closing: CancellationToken,
    cut: CancellationToken,
}

impl Upgrades {
    /// No upgraded connections yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `carry` (the bytes of one upgraded connection) until it ends
    /// or the drain time is over.
    pub fn spawn<F>(&self, carry: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cut = self.cut.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = cut.cancelled() => debug!("upgraded connection cut at the end of the drain"),
                () = carry => {}
            }
        });
    }

    /// The signal for HTTP served inside upgraded connections.
    pub fn closing(&self) -> Closing {
        Closing(self.closing.clone())
    }

    /// How many upgraded connections are open.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Asks what can finish to finish, waits up to `drain`, then cuts the
    /// rest.
    pub async fn shutdown(&self, drain: Duration) {
        self.closing.cancel();
        self.tracker.close();
        if !self.tracker.is_empty() {
            info!(open = self.tracker.len(), "draining upgraded connections");
        }
        if tokio::time::timeout(drain, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open = self.tracker.len(),
                "drain time over; cutting upgraded connections"
            );
            self.cut.cancel();
            self.tracker.wait().await;
        }
    }
}

/// Carries bytes both ways between two upgraded connections until both
/// sides have closed (a close on one side is passed to the other).
pub async fn splice<A, B>(mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut a, &mut b).await {
        Ok((there, back)) => debug!(there, back, "upgraded connection closed"),
        Err(err) => debug!(%err, "upgraded connection ended with an error"),
    }
}

/// A byte stream whose first bytes were already read (to tell TLS from
/// HTTP): they are read again first.
#[derive(Debug)]
pub struct Rewind<I> {
    prefix: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    /// `io`, with `prefix` read before it.
    pub fn new(prefix: Bytes, io: I) -> Self {
        Self { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A served connection with no request in progress for this long is
/// closed: between one and two periods after its last request ended (or
/// after it opened). A client trickling a request head never starts a
/// request, so this also bounds how long it holds the connection.
///
/// hyper's HTTP/1 header-read timeout would do both jobs, but it arms a
/// timer for every request (an allocation, and two trips to tokio's timer
/// wheel); this arms one per connection per period. The trade-off is
/// precision: a connection goes between one and two periods after its
/// last request, not at a set time. Envoy's `idle_timeout` counts the same
/// way (no active requests).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the idle watch of one connection sees.
#[derive(Debug, Default)]
struct Activity {
    /// Requests started plus requests ended: unchanged over a period means
    /// nothing began or finished in it.
    events: AtomicU64,
    /// Requests whose response has not been sent whole.
    in_flight: AtomicUsize,
}

impl Activity {
    /// Resolves once the connection has had no request in progress, and
    /// none starting or ending, for a whole `period`.
    async fn idle(&self, period: Duration) {
        let mut seen = self.events.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(period).await;
            let events = self.events.load(Ordering::Relaxed);
            if events == seen && self.in_flight.load(Ordering::Relaxed) == 0 {
                return;
            }
            seen = events;
        }
    }
}

/// One request in progress, from its head until its response body is
/// dropped (sent whole, or the connection gone).
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.events.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.events.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a connection is asked to end.
enum End {
    /// The listener is shutting down.
    Closing,
    /// Nothing happened on it for a whole idle period.
    Idle,
}

/// A response body that keeps its request counted as in flight.
#[derive(Debug)]
struct Tracked {
    body: ProxyBody,
    _in_flight: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves HTTP/1.1 and HTTP/2 on `io` until the connection ends, stays
/// idle for [`IDLE_TIMEOUT`], or `closing` asks it to close (after
/// finishing in-flight requests).
pub async fn serve_http<I, S, Fut>(io: I, closing: Closing, service: S)
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    serve_http_idle(io, closing, service, IDLE_TIMEOUT).await;
}

/// [`serve_http`] with the idle period as a parameter.
async fn serve_http_idle<I, S, Fut>(io: I, closing: Closing, service: S, idle: Duration)
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let counted = activity.clone();
    let svc = hyper::service::service_fn(move |req| {
        let in_flight = InFlight::start(&counted);
        let fut = service(req);
        async move {
            let rsp = fut.await;
            Ok::<_, Infallible>(rsp.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No per-request header timer: the idle watch below also bounds a
    // trickled request head.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(crate::transport::http2::MAX_HEADER_LIST_SIZE)
        .keep_alive_interval(Some(Duration::from_secs(10)));
    // With upgrades: WebSocket and CONNECT take the connection over.
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .into_owned();
    tokio::pin!(conn);
    // Polled only when they fire, not at every wake-up of the connection.
    let signal = OnWake::new(async {
        tokio::select! {
            biased;
            () = closing.requested() => End::Closing,
            () = activity.idle(idle) => End::Idle,
        }
    });
    let result = tokio::select! {
        biased;
        result = conn.as_mut() => result,
        end = signal => {
            conn.as_mut().graceful_shutdown();
            match end {
                End::Closing => conn.await,
                End::Idle => {
                    debug!(?idle, "closing an idle connection");
                    // Nothing is in flight: this ends at once (GOAWAY for
                    // HTTP/2). A client halfway through a request head gets
                    // no say.
                    match tokio::time::timeout(Duration::from_secs(1), conn).await {
                        Ok(result) => result,
                        Err(_) => Ok(()),
                    }
                }
            }
        }
    };
    if let Err(err) = result {
        debug!(%err, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use http_body_util::StreamBody;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::body;

    const PERIOD: Duration = Duration::from_millis(100);

    /// Serves one connection at a time with `service`, idle period
    /// [`PERIOD`]; returns the address.
    async fn server<S, Fut>(service: S) -> SocketAddr
    where
        S: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closing = CancellationToken::new();
        tokio::spawn(async move {
            let _keep = closing.clone();
            while let Ok((stream, _)) = listener.accept().await {
                let svc = service.clone();
                let closing = Closing(closing.clone());
                tokio::spawn(serve_http_idle(stream, closing, svc, PERIOD));
            }
        });
        addr
    }

    async fn hello(_: Request<Incoming>) -> Response<ProxyBody> {
        Response::new(body::full("hello"))
    }

    /// Reads until the server closes; what was read, and when it closed.
    async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> (String, Instant) {
        let mut read = Vec::new();
        tokio::time::timeout(limit, stream.read_to_end(&mut read))
            .await
            .expect("the server kept the connection open")
            .unwrap();
        (String::from_utf8_lossy(&read).into_owned(), Instant::now())
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_a_period_or_two() {
        let addr = server(hello).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let answered = Instant::now();
        let (read, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
        assert!(read.ends_with("hello"), "{read}");
        let idle = closed - answered;
        assert!(idle >= PERIOD, "closed after {idle:?} idle");
    }

    #[tokio::test]
    async fn a_trickled_request_head_does_not_hold_the_connection() {
        let addr = server(hello).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let started = Instant::now();
        let trickle = async {
            for i in 0..200 {
                let line = format!("x-{i}: 1\r\n");
                if stream.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(3), trickle)
            .await
            .expect("the trickled head was still accepted after 3 s");
        assert!(started.elapsed() >= PERIOD);
    }

    #[tokio::test]
    async fn a_slow_answer_and_a_slow_body_are_not_cut() {
        let addr = server(|_: Request<Incoming>| async {
            tokio::time::sleep(PERIOD * 3).await;
            // Two chunks further apart than two periods and the second
            // that an idle connection gets to finish.
            let chunks = futures::stream::unfold(0, |n| async move {
                match n {
                    0 => Some((Ok::<_, Infallible>(Frame::data(Bytes::from("slow "))), 1)),
                    1 => {
                        tokio::time::sleep(PERIOD * 3 + Duration::from_millis(1200)).await;
                        Some((Ok(Frame::data(Bytes::from("answer"))), 2))
                    }
                    _ => None,
                }
            });
            Response::new(body::boxed(StreamBody::new(chunks)))
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let (read, _) = read_to_close(&mut stream, Duration::from_secs(5)).await;
        assert!(read.contains("slow "), "{read}");
        assert!(read.contains("answer"), "{read}");
    }
}
