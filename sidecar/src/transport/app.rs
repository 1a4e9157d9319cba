//! The inbound's clients to the local app: HTTP/1.1 connections to one
//! address, kept open and reused ([`AppClient`]); HTTP/2 without TLS
//! (h2c, what gRPC servers speak) on hyper-util's pooled client, one
//! multiplexed connection ([`AppH2Client`]); and a connection of its own
//! for each Upgrade ([`upgrade`]).
//!
//! hyper-util's pooled client serves any number of hosts: every request
//! hashes its scheme and host into the pool's map, checks a connection out,
//! and returns it through a task of its own once the connection is ready
//! again. The inbound only ever talks to one address, so its pool is a
//! stack of idle connections: the most recently used is taken first (its
//! socket is warm, and the ones the app is about to time out sink to the
//! bottom, where they are dropped after [`IDLE_TIMEOUT`]).
//!
//! A connection goes back on the stack when its response body has been read
//! to the end and it can take the next request (its request body may still
//! be on its way); a response abandoned halfway closes it, since what is
//! left of the body would otherwise be read as the next response.
//!
//! Like hyper-util's client, a request that could not be written because
//! the app had just closed an idle connection is sent again on another one:
//! the app never saw it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, debug_span};

use crate::body::ProxyBody;

/// How long an unused connection is kept: as hyper-util's client.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// At most this many unused connections are kept; past it the oldest goes.
const MAX_IDLE: usize = 512;

/// Why a request did not get an answer from the app.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No connection to the app: the request was not sent.
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The app did not accept a connection in time: the request was not sent.
    #[error("cannot connect: no answer within {0:?}")]
    ConnectTimeout(Duration),
    /// The exchange failed after the request was (perhaps partly) sent.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl AppError {
    /// Whether the request was certainly not sent, so that it is safe to
    /// send it elsewhere.
    pub fn is_connect(&self) -> bool {
        matches!(self, AppError::Connect(_) | AppError::ConnectTimeout(_))
    }
}

/// Which protocol the app is spoken to in (`--app-protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AppProtocol {
    /// The caller's: HTTP/2 (h2c) for a request its app sent as HTTP/2,
    /// HTTP/1.1 for one sent as HTTP/1.x.
    #[default]
    Auto,
    /// Always HTTP/1.1, for an app that speaks nothing else.
    Http1,
    /// Always HTTP/2 with prior knowledge (h2c), for a gRPC-only app.
    Http2,
}

impl std::str::FromStr for AppProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AppProtocol::Auto),
            "http1" => Ok(AppProtocol::Http1),
            "http2" => Ok(AppProtocol::Http2),
            other => Err(format!(
                "{other:?} is not an app protocol: use auto, http1 or http2"
            )),
        }
    }
}

/// HTTP/2 with prior knowledge (h2c) to the app: hyper-util's client,
/// which keeps a connection and multiplexes every request on it.
#[derive(Debug, Clone)]
pub struct AppH2Client {
    client: hyper_util::client::legacy::Client<ToApp, ProxyBody>,
    authority: http::uri::Authority,
}

/// Connects to the app whatever the URI says: the URI carries the
/// caller's `:authority` (which HTTP/2 sends from the URI alone), not the
/// app's address.
#[derive(Debug, Clone, Copy)]
struct ToApp {
    addr: SocketAddr,
    timeout: Duration,
}

impl tower::Service<http::Uri> for ToApp {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let ToApp { addr, timeout } = *self;
        Box::pin(async move {
            let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {timeout:?}"),
                    )
                })??;
            let _ = stream.set_nodelay(true);
            Ok(TokioIo::new(stream))
        })
    }
}

impl AppH2Client {
    /// A client of the app at `addr`.
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .http2_max_header_list_size(crate::transport::http2::MAX_HEADER_LIST_SIZE)
                .build(ToApp {
                    addr,
                    timeout: connect_timeout,
                });
        let authority = http::uri::Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| http::uri::Authority::from_static("127.0.0.1"));
        Self { client, authority }
    }

    /// A request to the app made of `parts` and `body`, with the caller's
    /// `:authority` (its `Host` when it came as HTTP/1.1; the app's
    /// address when it named none).
    pub fn request_from(
        &self,
        mut parts: http::request::Parts,
        body: ProxyBody,
    ) -> Request<ProxyBody> {
        let named = parts.uri.authority().cloned().or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse().ok())
        });
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(named.unwrap_or_else(|| self.authority.clone()));
        uri.path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
        // HTTP/2 carries it as `:authority`.
        parts.headers.remove(http::header::HOST);
        if let Ok(uri) = http::Uri::from_parts(uri) {
            parts.uri = uri;
        }
        parts.version = http::Version::HTTP_2;
        Request::from_parts(parts, body)
    }

    /// Sends `req` (made by [`AppH2Client::request_from`]).
    pub async fn request(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(req).await
    }
}

/// Sends an Upgrade request to the app at `addr` on a connection of its
/// own, which becomes the upgraded byte stream after `101`.
pub async fn upgrade(
    addr: SocketAddr,
    connect_timeout: Duration,
    req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, AppError> {
    let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| AppError::ConnectTimeout(connect_timeout))?
        .map_err(AppError::Connect)?;
    let _ = stream.set_nodelay(true);
    let mut sender =
        super::http1::handshake(stream, debug_span!("app_upgrade", app = %addr)).await?;
    let rsp = sender.send_request(req).await?;
    Ok(rsp.map(crate::body::boxed))
}

/// HTTP/1.1 connections to the app at one address.
#[derive(Debug, Clone)]
pub struct AppClient {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Arc<Mutex<VecDeque<Idle>>>,
}

#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
}

impl AppClient {
    /// A client of the app at `addr`; a connection attempt is given up after
    /// `connect_timeout`.
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Self {
            addr,
            connect_timeout,
            idle_timeout: IDLE_TIMEOUT,
            idle: Arc::default(),
        }
    }

    /// The same client with unused connections dropped after `idle`.
    #[cfg(test)]
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// Sends `req`, whose URI must be in origin form (`/path?query`) and
    /// which must carry its own `Host`, on an idle connection or a new one.
    pub async fn request(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<AppBody>, AppError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            // An idle connection was ready when it was put back (a new one
            // is ready at once); an error means it closed since.
            if let Err(err) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(err.into());
            }
            match sender.try_send_request(req).await {
                Ok(rsp) => {
                    let pool = self.clone();
                    return Ok(rsp.map(|body| AppBody {
                        body,
                        sender: Some(sender),
                        done: false,
                        pool,
                    }));
                }
                Err(mut err) => match err.take_message() {
                    // Not written: the app closed this connection first.
                    Some(unsent) if reused => {
                        debug!("an idle connection to the app had closed; sending on another");
                        req = unsent;
                    }
                    _ => return Err(err.into_error().into()),
                },
            }
        }
    }

    fn checkout(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(Idle { sender, since }) = idle.pop_back() {
            if !sender.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    fn checkin(&self, sender: http1::SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Newest at the back, so the oldest are at the front.
        while idle.front().is_some_and(|i| {
            i.sender.is_closed() || now.duration_since(i.since) >= self.idle_timeout
        }) || idle.len() >= MAX_IDLE
        {
            idle.pop_front();
        }
        idle.push_back(Idle { sender, since: now });
    }

    async fn connect(&self) -> Result<http1::SendRequest<ProxyBody>, AppError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| AppError::ConnectTimeout(self.connect_timeout))?
            .map_err(AppError::Connect)?;
        stream.set_nodelay(true).map_err(AppError::Connect)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                debug!(%addr, %err, "connection to the app ended");
            }
        });
        Ok(sender)
    }

    /// Open connections waiting to be reused.
    #[cfg(test)]
    pub fn idle_connections(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.iter().filter(|i| !i.sender.is_closed()).count()
    }
}

/// The app's response body. Once read to the end, its connection is put
/// back for the next request.
#[derive(Debug)]
pub struct AppBody {
    body: Incoming,
    sender: Option<http1::SendRequest<ProxyBody>>,
    done: bool,
    pool: AppClient,
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            // A chunked body knows its end only here.
            None => this.done = true,
            // A connection that failed mid-answer is not reused.
            Some(Err(_)) => this.sender = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for AppBody {
    fn drop(&mut self) {
        let Some(mut sender) = self.sender.take() else {
            return;
        };
        if !self.is_end_stream() {
            return;
        }
        if sender.is_ready() {
            self.pool.checkin(sender);
            return;
        }
        // Not ready yet: the connection task has not seen the end of the
        // exchange, or the request body is still being sent (an app may
        // answer before reading it all). Put the connection back only once
        // it can take a request, so that no request waits behind a slow
        // upload; give up on it after the idle timeout.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.pool.clone();
        runtime.spawn(async move {
            let ready = tokio::time::timeout(pool.idle_timeout, sender.ready()).await;
            if matches!(ready, Ok(Ok(()))) {
                pool.checkin(sender);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::body;

    /// A server answering every request with `answer`; counts connections.
    /// With `close_after`, it closes each connection after that many
    /// answers, without saying so.
    async fn server(
        answer: &'static str,
        close_after: Option<usize>,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut answered = 0;
                    loop {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        // Requests without bodies: each ends with a blank line.
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            answered += 1;
                            if close_after == Some(answered) {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";

    fn get() -> Request<ProxyBody> {
        Request::get("/")
            .header(http::header::HOST, "app")
            .body(body::empty())
            .unwrap()
    }

    async fn text(client: &AppClient) -> String {
        let rsp = client.request(get()).await.unwrap();
        let bytes = rsp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Waits until `n` open connections are idle: a connection not ready at
    /// once is put back by a task, and a close is seen by one.
    async fn idle_becomes(client: &AppClient, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while client.idle_connections() != n {
            assert!(
                Instant::now() < deadline,
                "{} idle connections, not {n}",
                client.idle_connections()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_answer_was_read() {
        let (addr, accepted) = server(OK, None).await;
        let client = AppClient::new(addr, Duration::from_secs(1));
        for _ in 0..5 {
            assert_eq!(text(&client).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        idle_becomes(&client, 1).await;
    }

    #[tokio::test]
    async fn concurrent_requests_get_connections_of_their_own() {
        let (addr, accepted) = server(OK, None).await;
        let client = AppClient::new(addr, Duration::from_secs(1));
        let first = client.request(get()).await.unwrap();
        let second = client.request(get()).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop((
            first.into_body().collect().await,
            second.into_body().collect().await,
        ));
        idle_becomes(&client, 2).await;
    }

    #[tokio::test]
    async fn an_answer_abandoned_halfway_closes_its_connection() {
        let (addr, accepted) = server(OK, None).await;
        let client = AppClient::new(addr, Duration::from_secs(1));
        drop(client.request(get()).await.unwrap());
        assert_eq!(client.idle_connections(), 0);
        assert_eq!(text(&client).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_empty_answer_frees_its_connection_unread() {
        let (addr, accepted) = server("HTTP/1.1 204 No Content\r\n\r\n", None).await;
        let client = AppClient::new(addr, Duration::from_secs(1));
        for _ in 0..3 {
            let rsp = client.request(get()).await.unwrap();
            assert_eq!(rsp.status(), 204);
            assert!(rsp.body().is_end_stream());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_while_idle_is_not_used() {
        let (addr, accepted) = server(OK, Some(1)).await;
        let client = AppClient::new(addr, Duration::from_secs(1));
        for _ in 0..4 {
            assert_eq!(text(&client).await, "hello");
            // Until the connection task has seen the close.
            idle_becomes(&client, 0).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn no_request_waits_behind_an_unfinished_upload() {
        // The app answers at once and never reads the body, which never ends.
        let (addr, accepted) = server(OK, None).await;
        let client = AppClient::new(addr, Duration::from_secs(1));
        let upload = http_body_util::StreamBody::new(futures::stream::pending::<
            Result<Frame<Bytes>, body::BoxError>,
        >());
        let post = Request::post("/")
            .header(http::header::HOST, "app")
            .body(body::boxed(upload))
            .unwrap();
        let rsp = client.request(post).await.unwrap();
        assert_eq!(rsp.into_body().collect().await.unwrap().to_bytes(), "hello");
        let next = tokio::time::timeout(Duration::from_secs(5), text(&client)).await;
        assert_eq!(
            next.expect("the next request waited for the upload"),
            "hello"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let (addr, accepted) = server(OK, None).await;
        let client = AppClient::new(addr, Duration::from_secs(1))
            .with_idle_timeout(Duration::from_millis(50));
        assert_eq!(text(&client).await, "hello");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(text(&client).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = AppClient::new(addr, Duration::from_secs(1));
        let err = client.request(get()).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
        assert!(err.to_string().contains("refused"), "{err}");
    }

    #[tokio::test]
    async fn a_failure_after_sending_is_not_a_connect_error() {
        // Reads the request, then closes without answering.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
        });
        let client = AppClient::new(addr, Duration::from_secs(1));
        let err = client.request(get()).await.unwrap_err();
        assert!(!err.is_connect(), "{err}");
    }
}
