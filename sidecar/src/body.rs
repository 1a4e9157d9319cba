//! Request and response bodies as they cross the proxy: recording small
//! request bodies while they stream, so they can be sent again on a retry
//! ([`record`]), and watching a request body's end and idleness for the
//! request timeout ([`watch`]).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::SizeHint;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame};

/// The boxed error every body and service in the proxy uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body of any origin: an incoming stream, a buffered copy, a generated
/// error page.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Request bodies up to this size are kept while they are sent, so that a
/// request the peer did not process can be sent again: big enough for
/// typical JSON calls, small enough that holding a copy per in-flight
/// request costs little.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// A request extension through which a retry can send a request's body
/// again: present when the request has a body. (A request whose body is
/// empty may always be sent again, and carries none.)
#[derive(Debug, Clone)]
pub struct Replay(Arc<Mutex<Tape>>);

/// What the first attempt read of a body, kept for one more attempt.
#[derive(Default)]
struct Tape {
    /// The rest of the body, given back by a first attempt that stopped
    /// before the end (a connection that failed, a stream refused).
    rest: Option<ProxyBody>,
    data: Vec<Bytes>,
    len: usize,
    trailers: Option<http::HeaderMap>,
    /// The first attempt read the whole body: the tape holds all of it.
    ended: bool,
    /// More than [`REPLAY_LIMIT`] was read: the tape is of no use.
    overflow: bool,
    /// A replay waiting for `rest`.
    waiting: Option<Waker>,
}

impl std::fmt::Debug for Tape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tape")
            .field("len", &self.len)
            .field("ended", &self.ended)
            .field("overflow", &self.overflow)
            .finish_non_exhaustive()
    }
}

fn lock(tape: &Mutex<Tape>) -> std::sync::MutexGuard<'_, Tape> {
    tape.lock().unwrap_or_else(|p| p.into_inner())
}

/// Streams `body` as it comes (nothing waits for it to be buffered: a
/// gRPC stream sends a message and waits for the answer) while keeping a
/// copy of what was read, up to [`REPLAY_LIMIT`]; the [`Replay`] makes a
/// second body from that copy and whatever the first did not read.
pub fn record(body: ProxyBody) -> (ProxyBody, Replay) {
    let tape = Arc::new(Mutex::new(Tape::default()));
    let recorded = Recorded {
        inner: Some(body),
        tape: tape.clone(),
    };
    (BoxBody::new(recorded), Replay(tape))
}

impl Replay {
    /// Whether [`Replay::body`] can give the whole body again now: the
    /// first attempt read all of it within the limit, or stopped and gave
    /// the rest back. A body still being sent by the first attempt is not
    /// waited for.
    pub fn ready(&self) -> bool {
        let tape = lock(&self.0);
        !tape.overflow && (tape.ended || tape.rest.is_some())
    }

    /// The body again: what the first attempt read, then the rest.
    pub fn body(&self) -> ProxyBody {
        BoxBody::new(Replayed {
            tape: self.0.clone(),
            next: 0,
            trailers_sent: false,
            rest: None,
        })
    }
}

/// The first attempt's body: reads `inner`, recording it on the tape.
struct Recorded {
    inner: Option<ProxyBody>,
    tape: Arc<Mutex<Tape>>,
}

impl Body for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        let mut tape = lock(&self.tape);
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if !tape.overflow && tape.len + data.len() <= REPLAY_LIMIT {
                        tape.len += data.len();
                        tape.data.push(data.clone());
                    } else {
                        tape.overflow = true;
                        tape.data = Vec::new();
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    tape.trailers = Some(trailers.clone());
                }
            }
            None => tape.ended = true,
            Some(Err(_)) => tape.overflow = true,
        }
        drop(tape);
        if frame.is_none() {
            self.inner = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let mut tape = lock(&self.tape);
        if let Some(inner) = self.inner.take() {
            if inner.is_end_stream() {
                tape.ended = true;
            } else {
                tape.rest = Some(inner);
            }
        }
        if let Some(waker) = tape.waiting.take() {
            waker.wake();
        }
    }
}

/// The second attempt's body.
struct Replayed {
    tape: Arc<Mutex<Tape>>,
    next: usize,
    trailers_sent: bool,
    rest: Option<ProxyBody>,
}

/// A replayed body could not be made whole again.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than {REPLAY_LIMIT} bytes and cannot be sent again")]
pub struct ReplayOverflow;

impl Body for Replayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(rest) = this.rest.as_mut() {
            return Pin::new(rest).poll_frame(cx);
        }
        let mut tape = lock(&this.tape);
        if tape.overflow {
            return Poll::Ready(Some(Err(Box::new(ReplayOverflow))));
        }
        if let Some(data) = tape.data.get(this.next) {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
        }
        if tape.ended {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(trailers) = tape.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
            return Poll::Ready(None);
        }
        match tape.rest.take() {
            Some(rest) => {
                drop(tape);
                this.rest = Some(rest);
                self.poll_frame(cx)
            }
            None => {
                // The first attempt still holds the rest; it gives it back
                // when dropped.
                tape.waiting = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// A request body that sent nothing for the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for {}", humantime::format_duration(*.0))]
pub struct BodyIdle(pub Duration);

/// Resolves when a body [`watch`]ed was read to its end, or dropped.
#[derive(Debug)]
pub struct BodyEnd {
    ended: tokio::sync::oneshot::Receiver<()>,
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl BodyEnd {
    /// Set once the body was cut for sending nothing: a failure that
    /// follows is the caller's stall, not the peer's.
    pub fn stalled(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.stalled.clone()
    }
}

impl std::future::Future for BodyEnd {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.ended).poll(cx).map(|_| ())
    }
}

/// `body`, telling [`BodyEnd`] when it ends (request timeouts count from
/// there, so a slow upload is not cut), and failing with [`BodyIdle`] when
/// it sends nothing for `idle` (so a stalled one is).
pub fn watch(body: ProxyBody, idle: Option<Duration>) -> (ProxyBody, BodyEnd) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watched = Watched {
        inner: body,
        ended: Some(tx),
        idle: idle.map(|after| (after, Box::pin(tokio::time::sleep(after)))),
        stalled: stalled.clone(),
    };
    (BoxBody::new(watched), BodyEnd { ended: rx, stalled })
}

struct Watched {
    inner: ProxyBody,
    ended: Option<tokio::sync::oneshot::Sender<()>>,
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if frame.is_none() || this.inner.is_end_stream() {
                    if let Some(tx) = this.ended.take() {
                        let _ = tx.send(());
                    }
                } else if let Some((after, timer)) = &mut this.idle {
                    timer.as_mut().reset(tokio::time::Instant::now() + *after);
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                if let Some((after, timer)) = &mut this.idle
                    && timer.as_mut().poll(cx).is_ready()
                {
                    this.stalled
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    return Poll::Ready(Some(Err(Box::new(BodyIdle(*after)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::StreamBody;

    use super::*;

    fn chunks(sizes: &[usize]) -> ProxyBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = sizes
            .iter()
            .map(|&n| Ok(Frame::data(Bytes::from(vec![7u8; n]))))
            .collect();
        BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)))
    }

    #[tokio::test]
    async fn a_body_read_whole_is_replayed_from_the_tape() {
        let (body, replay) = record(chunks(&[3, 4]));
        assert!(!replay.ready(), "still held by the first attempt");
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 7);
        assert!(replay.ready());
        assert_eq!(replay.body().collect().await.unwrap().to_bytes().len(), 7);
    }

    #[tokio::test]
    async fn a_body_given_back_halfway_is_replayed_whole() {
        let (mut body, replay) = record(chunks(&[3, 4, 5]));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap().len(), 3);
        drop(body);
        assert!(replay.ready());
        assert_eq!(replay.body().collect().await.unwrap().to_bytes().len(), 12);
    }

    #[tokio::test]
    async fn a_large_body_streams_whole_and_is_not_replayed() {
        let (body, replay) = record(chunks(&[8 * 1024; 20]));
        assert_eq!(
            body.collect().await.unwrap().to_bytes().len(),
            20 * 8 * 1024
        );
        assert!(!replay.ready());
        assert!(replay.body().collect().await.is_err());
    }

    #[tokio::test]
    async fn a_stream_is_passed_on_before_it_ends() {
        // A body that sends one frame and then waits: the first frame must
        // come through at once (a gRPC stream waits for its answer).
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = StreamBody::new(tokio_stream_from(rx));
        let (mut body, _replay) = record(BodyExt::boxed(stream));
        tx.send(Ok(Frame::data(Bytes::from_static(b"hi"))))
            .await
            .unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(2), body.frame())
            .await
            .expect("the first frame waited for the rest");
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "hi");
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test(start_paused = true)]
    async fn a_watched_body_reports_its_end_and_its_stall() {
        let (body, end) = watch(chunks(&[1, 2]), Some(Duration::from_secs(5)));
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 3);
        end.await;

        let stalled = StreamBody::new(futures::stream::pending::<Result<Frame<Bytes>, BoxError>>());
        let (body, end) = watch(BodyExt::boxed(stalled), Some(Duration::from_secs(5)));
        let started = tokio::time::Instant::now();
        let err = body.collect().await.unwrap_err();
        assert!(err.is::<BodyIdle>(), "{err}");
        assert!(end.stalled().load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
