//! What the HTTP/2 client ([`super::h2_client`]) and server
//! ([`super::h2_server`]) between sidecars share, on the `h2` crate: the
//! connection settings (those hyper uses), bodies as [`http_body::Body`]
//! within HTTP/2 flow control ([`RecvBody`] returns capacity as data is
//! read, [`send_body`] waits for capacity before each piece), keep-alive
//! pings ([`keepalive`]) and the batching of writes ([`Batched`]).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::{Ping, PingPong, RecvStream, SendStream};
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use http_body::{Body, Frame, SizeHint};

use crate::body::{BoxError, ProxyBody};

/// How often an idle or busy connection is pinged.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a ping may go unanswered before the peer counts as gone: a peer
/// that vanished without a FIN is noticed, and the next request reconnects
/// instead of waiting for the request timeout.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Streams a peer may open on one connection. Above the default per
/// destination pending limit, so that limit, not this one, is what callers
/// meet.
pub const MAX_CONCURRENT_STREAMS: u32 = 2048;

const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// Above [`crate::headers::MAX_HEADER_BYTES`]: a larger header section
/// reaches the proxy, which answers 431 with `x-signpost-error`, rather
/// than failing inside HTTP/2 with no status.
pub const MAX_HEADER_LIST_SIZE: u32 = 256 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;

/// The client settings, as hyper's defaults.
pub fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER);
    builder
}

/// The server settings.
pub fn server_builder() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    builder
}

/// Why a connection was closed by its keep-alive.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    /// The peer did not answer a ping in time.
    #[error("no answer to a ping within {0:?}")]
    Timeout(Duration),
    /// The ping could not be sent or its answer not read.
    #[error("ping failed: {0}")]
    Ping(#[from] h2::Error),
}

/// Pings the peer every [`KEEPALIVE_INTERVAL`]; returns when an answer does
/// not come within [`KEEPALIVE_TIMEOUT`]. Never returns while the peer
/// answers, nor without a ping handle (`ping_pong()` gives it only once):
/// run it beside the connection and drop the connection when it returns.
pub async fn keepalive(ping_pong: Option<PingPong>) -> KeepaliveError {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(err)) => return KeepaliveError::Ping(err),
            Err(_) => return KeepaliveError::Timeout(KEEPALIVE_TIMEOUT),
        }
    }
}

/// A connection future that, each time it is woken, first lets the other
/// woken tasks run.
///
/// A request written by the app's connection task wakes the HTTP/2
/// connection at once (tokio runs a just-woken task next), so without this
/// every request would leave in a write of its own. Yielding once puts the
/// connection behind the other tasks that are ready, and the frames they
/// queue meanwhile go out together: one write for a burst of requests, as
/// hyper's dispatch task gets. The trade-off: each wake-up costs one more
/// trip through the scheduler, and a lone request waits for the tasks
/// ready before it.
#[derive(Debug)]
pub struct Batched<F> {
    inner: F,
    yielded: bool,
}

impl<F> Batched<F> {
    /// Wraps `inner`.
    pub fn new(inner: F) -> Self {
        Self {
            inner,
            yielded: false,
        }
    }
}

impl<F: std::future::Future + Unpin> std::future::Future for Batched<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if !self.yielded {
            self.yielded = true;
            // Runs this task again after those already ready.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// The `content-length` of a message, when present and valid.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A received HTTP/2 body, returning flow-control capacity as it is read.
#[derive(Debug)]
pub struct RecvBody {
    stream: RecvStream,
    data_done: bool,
    /// Bytes still expected, from `content-length`, for the size hint.
    remaining: Option<u64>,
}

impl RecvBody {
    /// Wraps `stream`, whose message announced `content_length`.
    pub fn new(stream: RecvStream, content_length: Option<u64>) -> Self {
        Self {
            stream,
            data_done: false,
            remaining: content_length,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match this.stream.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    // The data is ours now: let the peer send more.
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    if let Some(left) = &mut this.remaining {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match this.stream.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(err)) => Poll::Ready(Some(Err(err))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Why a body could not be sent whole.
#[derive(Debug, thiserror::Error)]
pub enum SendBodyError {
    /// Reading the body failed (the app or the peer broke off).
    #[error("reading the body failed: {0}")]
    Read(BoxError),
    /// The stream was reset or the connection closed.
    #[error("sending the body failed: {0}")]
    Send(#[from] h2::Error),
}

/// Sends `body` on `stream`, within HTTP/2 flow control, and ends the
/// stream. A body that fails to read resets the stream, so the other side
/// sees an error rather than a short message.
pub async fn send_body(
    mut body: ProxyBody,
    stream: &mut SendStream<Bytes>,
) -> Result<(), SendBodyError> {
    let result = pump(&mut body, stream).await;
    if let Err(SendBodyError::Read(_)) = &result {
        stream.send_reset(h2::Reason::INTERNAL_ERROR);
    }
    result
}

/// The body's next frame, or the stream's reset if that comes first: a
/// body waiting on its sender (a stream waiting for an answer) must not
/// keep a stream the peer refused, nor the body, which a retry may need.
async fn next_frame(
    body: &mut ProxyBody,
    stream: &mut SendStream<Bytes>,
) -> Result<Option<Result<Frame<Bytes>, BoxError>>, SendBodyError> {
    std::future::poll_fn(|cx| {
        if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
            return Poll::Ready(Ok(frame));
        }
        match stream.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => Poll::Ready(Err(SendBodyError::Send(reason.into()))),
            Poll::Ready(Err(err)) => Poll::Ready(Err(SendBodyError::Send(err))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

async fn pump(body: &mut ProxyBody, stream: &mut SendStream<Bytes>) -> Result<(), SendBodyError> {
    loop {
        let Some(frame) = next_frame(body, stream).await? else {
            // Ended without a last frame marked as such: close the stream.
            stream.send_data(Bytes::new(), true)?;
            return Ok(());
        };
        let frame = frame.map_err(SendBodyError::Read)?;
        let frame = match frame.into_data() {
            Ok(data) => {
                let last = body.is_end_stream();
                send_data(stream, data, last).await?;
                if last {
                    return Ok(());
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            stream.send_trailers(trailers)?;
            return Ok(());
        }
    }
}

/// Sends `data`, waiting for flow-control capacity; `last` ends the stream
/// with the final piece.
async fn send_data(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
    last: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        if last {
            stream.send_data(data, true)?;
        }
        return Ok(());
    }
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        // Capacity already held is used as it is: `poll_capacity` only
        // answers when capacity grows.
        let mut granted = stream.capacity();
        if granted == 0 {
            granted = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(granted) => granted?,
                None => return Err(h2::Error::from(h2::Reason::STREAM_CLOSED)),
            };
            if granted == 0 {
                continue;
            }
        }
        let piece = data.split_to(granted.min(data.len()));
        stream.send_data(piece, last && data.is_empty())?;
    }
    Ok(())
}

/// Boxes a received HTTP/2 body as the proxy's body type.
pub fn boxed(stream: RecvStream, headers: &HeaderMap) -> ProxyBody {
    crate::body::boxed(RecvBody::new(stream, content_length(headers)))
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};
    use tokio::io::duplex;

    use super::*;

    /// A client and a server over an in-memory pipe; the server's
    /// connection is driven by a task that answers each request with
    /// `answer(request body)`.
    async fn pair<F>(answer: F) -> h2::client::SendRequest<Bytes>
    where
        F: Fn(Bytes) -> ProxyBody + Send + Sync + 'static,
    {
        let (client_io, server_io) = duplex(64 * 1024);
        let answer = std::sync::Arc::new(answer);
        tokio::spawn(async move {
            let mut conn = server_builder().handshake(server_io).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let (parts, recv) = req.into_parts();
                    let body = boxed(recv, &parts.headers)
                        .collect()
                        .await
                        .unwrap()
                        .to_bytes();
                    let rsp = http::Response::new(());
                    let mut send = respond.send_response(rsp, false).unwrap();
                    send_body(answer(body), &mut send).await.unwrap();
                });
            }
        });
        let (send, conn) = client_builder().handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        send
    }

    async fn roundtrip(send: &h2::client::SendRequest<Bytes>, body: ProxyBody) -> Bytes {
        exchange(send, body).await.to_bytes()
    }

    async fn exchange(
        send: &h2::client::SendRequest<Bytes>,
        body: ProxyBody,
    ) -> http_body_util::Collected<Bytes> {
        let mut send = send.clone().ready().await.unwrap();
        let req = http::Request::post("http://peer/").body(()).unwrap();
        let (rsp, mut stream) = send.send_request(req, false).unwrap();
        send_body(body, &mut stream).await.unwrap();
        let rsp = rsp.await.unwrap();
        let (parts, recv) = rsp.into_parts();
        boxed(recv, &parts.headers).collect().await.unwrap()
    }

    #[tokio::test]
    async fn bodies_cross_both_ways_beyond_the_flow_control_window() {
        // 3 MiB: more than a stream's window, so capacity must come back.
        let send = pair(|body: Bytes| crate::body::full(body)).await;
        let big = Bytes::from(vec![7u8; 3 * 1024 * 1024]);
        let echoed = roundtrip(&send, crate::body::full(big.clone())).await;
        assert_eq!(echoed.len(), big.len());
        assert_eq!(echoed, big);
    }

    #[tokio::test]
    async fn empty_and_chunked_bodies() {
        let send = pair(|body: Bytes| crate::body::full(body)).await;
        assert!(roundtrip(&send, crate::body::empty()).await.is_empty());
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = ["a", "", "bc"]
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        let body = BodyExt::boxed(StreamBody::new(futures::stream::iter(chunks)));
        assert_eq!(roundtrip(&send, body).await, "abc");

        // Small pieces between pieces larger than a window: capacity left
        // over from one piece must serve the next.
        let sizes = [70 * 1024, 1, 3 * 1024 * 1024, 0, 1, 17];
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = sizes
            .iter()
            .map(|&n| Ok(Frame::data(Bytes::from(vec![1u8; n]))))
            .collect();
        let body = BodyExt::boxed(StreamBody::new(futures::stream::iter(chunks)));
        let echoed = roundtrip(&send, body).await;
        assert_eq!(echoed.len(), sizes.iter().sum::<usize>());
    }

    #[tokio::test]
    async fn trailers_are_carried() {
        let send = pair(|_| {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::from_static(b"x"))),
                Ok(Frame::trailers(trailers)),
            ];
            BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)))
        })
        .await;
        let collected = exchange(&send, crate::body::empty()).await;
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "x");
    }

    #[test]
    fn batched_yields_once_per_wake_up_then_polls() {
        use std::future::Future;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::Wake;

        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = Batched::new(std::future::ready(7));
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "it asks to run again");
        assert_eq!(Pin::new(&mut fut).poll(&mut cx), Poll::Ready(7));
    }

    #[tokio::test]
    async fn content_length_is_read_when_valid() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, "12".parse().unwrap());
        assert_eq!(content_length(&headers), Some(12));
        headers.insert(CONTENT_LENGTH, "twelve".parse().unwrap());
        assert_eq!(content_length(&headers), None);
    }
}
