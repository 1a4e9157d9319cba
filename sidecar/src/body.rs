//! Request and response bodies as they cross the proxy, and buffering of
//! small request bodies so they can be sent again on a retry.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, BodyStream, Empty, Full, StreamBody};
use hyper::body::{Body, Frame};

/// The boxed error every body and service in the proxy uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body of any origin: an incoming stream, a buffered copy, a generated
/// error page.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Request bodies up to this size are buffered and may be retried: big
/// enough for typical JSON calls, small enough that holding a copy per
/// in-flight request costs little.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// A request extension holding the complete body, present when the request
/// has one and may be sent again. (A request whose body is empty may always
/// be sent again, and carries none.)
#[derive(Debug, Clone)]
pub struct Replay(pub Bytes);

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

/// Reads up to [`REPLAY_LIMIT`] bytes of `body`. When the whole body fits,
/// returns it complete (for [`Replay`]); otherwise returns a body that
/// yields what was read and then the rest, and `None`.
///
/// Trailers end buffering: a body with trailers is streamed, not replayed,
/// since its trailers could not be sent again.
pub async fn buffer<B>(body: B) -> Result<(ProxyBody, Option<Bytes>), BoxError>
where
    B: Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return Ok((empty(), Some(Bytes::new())));
    }
    let mut stream = BodyStream::new(body.map_err(Into::<BoxError>::into));
    let mut read = BytesMut::new();
    let mut held: Vec<Frame<Bytes>> = Vec::new();
    loop {
        match stream.next().await {
            None => {
                let bytes = read.freeze();
                return Ok((full(bytes.clone()), Some(bytes)));
            }
            Some(Err(err)) => return Err(err),
            Some(Ok(frame)) => {
                let data = frame.data_ref().cloned();
                let is_data = data.is_some();
                if let Some(data) = data {
                    read.extend_from_slice(&data);
                }
                held.push(frame);
                if !is_data || read.len() > REPLAY_LIMIT {
                    let prefix = futures::stream::iter(held.into_iter().map(Ok));
                    let body = StreamBody::new(prefix.chain(stream));
                    return Ok((BoxBody::new(body), None));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_bodies_are_kept_for_replay() {
        let (body, replay) = buffer(Full::new(Bytes::from_static(b"hello")))
            .await
            .unwrap();
        assert_eq!(replay.as_deref(), Some(&b"hello"[..]));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
    }

    #[tokio::test]
    async fn large_bodies_stream_whole_without_replay() {
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = (0..20)
            .map(|_| Ok(Frame::data(Bytes::from(vec![7u8; 8 * 1024]))))
            .collect();
        let source = StreamBody::new(futures::stream::iter(chunks));
        let (body, replay) = buffer(source).await.unwrap();
        assert!(replay.is_none());
        assert_eq!(
            body.collect().await.unwrap().to_bytes().len(),
            20 * 8 * 1024
        );
    }
}
