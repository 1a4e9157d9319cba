//! The call metadata the Echo server handles below the generated code, in
//! a tower layer around it: tonic hands a handler neither the request's
//! `:authority` nor a way to add trailers to a successful reply.
//!
//! On the way in, the layer records the `:authority` and the `grpc-timeout`
//! in a [`CallInfo`] request extension (tonic passes extensions through to
//! the handler). On the way out, it adds the trailer [`INSTANCE_TRAILER`]
//! to every answer and copies a request's [`ECHO_HEADER`] into the response
//! headers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HOST;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Frame;
use tonic::body::Body;
use tower::{Layer, Service};

/// The trailer naming the instance that served a call, on every answer.
pub const INSTANCE_TRAILER: &str = "x-instance";

/// A request header the server answers back as a response header.
pub const ECHO_HEADER: &str = "x-echo";

const INSTANCE: HeaderName = HeaderName::from_static(INSTANCE_TRAILER);
const ECHO: HeaderName = HeaderName::from_static(ECHO_HEADER);
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// What the server saw of a call's request head, for the reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CallInfo {
    /// `:authority` (or `Host`); empty when the request had neither.
    pub authority: String,
    /// The client's deadline from `grpc-timeout`, when it sent one.
    pub timeout: Option<Duration>,
}

impl CallInfo {
    fn of<B>(req: &Request<B>) -> Self {
        let authority = match req.uri().authority() {
            Some(authority) => authority.as_str().to_string(),
            None => req
                .headers()
                .get(HOST)
                .and_then(|host| host.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        };
        let timeout = req
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|value| parse_grpc_timeout(value.as_bytes()));
        CallInfo { authority, timeout }
    }
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`), as in gRPC's PROTOCOL-HTTP2.md. `None` if malformed.
fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: even in hours it fits a u64 of seconds.
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Wraps the Echo routes in [`Metadata`].
#[derive(Debug, Clone)]
pub(crate) struct MetadataLayer {
    instance: HeaderValue,
}

impl MetadataLayer {
    /// Answers `instance` in the [`INSTANCE_TRAILER`] trailer.
    pub(crate) fn new(instance: HeaderValue) -> Self {
        MetadataLayer { instance }
    }
}

impl<S> Layer<S> for MetadataLayer {
    type Service = Metadata<S>;

    fn layer(&self, inner: S) -> Metadata<S> {
        Metadata {
            inner,
            instance: self.instance.clone(),
        }
    }
}

/// The service [`MetadataLayer`] makes.
#[derive(Debug, Clone)]
pub(crate) struct Metadata<S> {
    inner: S,
    instance: HeaderValue,
}

impl<S, B> Service<Request<B>> for Metadata<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let info = CallInfo::of(&req);
        req.extensions_mut().insert(info);
        let echo = req.headers().get(ECHO).cloned();
        let instance = self.instance.clone();
        let answer = self.inner.call(req);
        Box::pin(async move { Ok(decorate(answer.await?, instance, echo)) })
    }
}

/// Adds the instance trailer and the echoed header to an answer.
fn decorate(
    mut rsp: Response<Body>,
    instance: HeaderValue,
    echo: Option<HeaderValue>,
) -> Response<Body> {
    if let Some(echo) = echo {
        rsp.headers_mut().insert(ECHO, echo);
    }
    if rsp.headers().contains_key(GRPC_STATUS) {
        // A trailers-only answer (an error before any message): gRPC reads
        // its headers as the trailers, and there is no trailer frame to
        // come.
        rsp.headers_mut().insert(INSTANCE, instance);
        return rsp;
    }
    rsp.map(|body| {
        Body::new(body.map_frame(move |frame| match frame.into_trailers() {
            Ok(mut trailers) => {
                trailers.insert(INSTANCE, instance.clone());
                Frame::trailers(trailers)
            }
            Err(frame) => frame,
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_takes_every_unit() {
        let cases: [(&[u8], Duration); 6] = [
            (b"2H", Duration::from_secs(7200)),
            (b"3M", Duration::from_secs(180)),
            (b"4S", Duration::from_secs(4)),
            (b"250m", Duration::from_millis(250)),
            (b"99999999u", Duration::from_micros(99_999_999)),
            (b"7n", Duration::from_nanos(7)),
        ];
        for (value, want) in cases {
            assert_eq!(parse_grpc_timeout(value), Some(want), "{value:?}");
        }
    }

    #[test]
    fn grpc_timeout_rejects_malformed_values() {
        for value in [
            &b""[..],
            b"m",
            b"100",
            b"100x",
            b"123456789m",
            b"-1S",
            b"1 S",
        ] {
            assert_eq!(parse_grpc_timeout(value), None, "{value:?}");
        }
    }

    #[test]
    fn call_info_falls_back_to_host() {
        let req = Request::builder()
            .uri("/signpost.echo.v1.Echo/Unary")
            .header(HOST, "grpc-echo")
            .header(GRPC_TIMEOUT, "100m")
            .body(())
            .expect("request");
        assert_eq!(
            CallInfo::of(&req),
            CallInfo {
                authority: "grpc-echo".to_string(),
                timeout: Some(Duration::from_millis(100)),
            }
        );
    }
}
