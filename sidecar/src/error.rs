//! Errors: why the sidecar could not start or run, and why it answered a
//! request itself instead of passing on a peer's answer.
//!
//! Every answer the sidecar makes up carries an `x-signpost-error` header
//! with the same one-line message as the body, so a person reading `curl -i`
//! output, or a log of response headers, can tell a mesh failure ("no
//! healthy instance of user") from the app's own 503.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};

use crate::body::{ProxyBody, full};
use crate::outbound::endpoint::{ConnectError, EndpointError};

/// Header naming why the sidecar answered a request itself.
pub const ERROR_HEADER: http::HeaderName = http::HeaderName::from_static("x-signpost-error");

/// Header a peer's inbound adds to an answer it made without passing the
/// request to its app (the app was down, the caller not allowed, no
/// certificate yet): the caller's sidecar may send such a request again,
/// whatever its method. Removed from the app's own answers, so an app
/// cannot claim it.
pub const NOT_FORWARDED_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-signpost-not-forwarded");

/// Why the sidecar could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// A listener could not be bound.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        /// Which listener (`inbound`, `outbound`, `admin`, `upstream db`).
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The configuration is not usable.
    #[error("invalid sidecar configuration: {0}")]
    Config(String),
    /// The control plane refused or could not be reached for something the
    /// sidecar cannot start without.
    #[error("control plane: {0}")]
    ControlPlane(#[from] signpost_control_plane::client::ClientError),
    /// The certificate could not be obtained or used.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The DNS resolver could not be set up.
    #[error(transparent)]
    Resolve(#[from] crate::discovery::ResolveError),
    /// The sidecar's main task panicked or was aborted.
    #[error("the sidecar stopped unexpectedly: {0}")]
    Crashed(String),
}

/// Why the sidecar answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Discovery found no endpoint for the destination.
    #[error("no healthy instance of {service}{}", dns.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    NoHealthyInstance {
        /// The destination.
        service: String,
        /// Why, when DNS failed rather than answered "none".
        dns: Option<String>,
    },
    /// The destination has more pending requests than allowed.
    #[error("{service}: too many pending requests (limit {limit})")]
    Overloaded {
        /// The destination.
        service: String,
        /// The limit.
        limit: usize,
    },
    /// The peer could not be reached.
    #[error("{service}: {source}")]
    Unreachable {
        /// The destination.
        service: String,
        /// Why.
        source: EndpointError,
    },
    /// The local app does not accept connections (stopped, crashed, not
    /// started yet): the request never reached it.
    #[error("{service}: app at {app}: {reason}")]
    AppUnavailable {
        /// This service.
        service: String,
        /// The app's address.
        app: SocketAddr,
        /// Why the connection failed.
        reason: String,
    },
    /// Something else failed on the way to the peer.
    #[error("{service}: {reason}")]
    BadGateway {
        /// The destination.
        service: String,
        /// Why.
        reason: String,
    },
    /// No response within the request timeout.
    #[error("{service}: no response within {}", humantime::format_duration(*.after))]
    Timeout {
        /// The destination.
        service: String,
        /// The request timeout.
        after: Duration,
    },
    /// The caller may not call this service.
    #[error("{caller} is not allowed to call {service}")]
    Forbidden {
        /// The caller's service, or a description of an unidentified caller.
        caller: String,
        /// This service.
        service: String,
        /// Why, for the response body (the header keeps the short line).
        why: String,
    },
    /// The request already passed through this sidecar.
    #[error("loop detected: the request already passed through sidecar {id}")]
    Loop {
        /// This sidecar's id.
        id: String,
    },
    /// The request names no usable destination.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The sidecar has no workload certificate yet, so it can neither call
    /// a peer nor be called over mesh TLS.
    #[error("no certificate yet: {reason}")]
    NoCertificate {
        /// Why the last attempt to get one failed.
        reason: String,
    },
    /// The request's header section is larger than the sidecar accepts.
    #[error("request headers of {size} bytes exceed the limit of {limit} bytes")]
    HeadersTooLarge {
        /// Their size, counted as HTTP/2 does (name + value + 32 each).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The caller's request body sent nothing for the body idle timeout.
    #[error("the request body sent nothing for {}; request cut", humantime::format_duration(*.after))]
    BodyStalled {
        /// The idle timeout.
        after: Duration,
    },
    /// `--egress deny`: nothing may leave the mesh.
    #[error("{host} is outside the mesh and egress is denied (--egress deny)")]
    EgressDenied {
        /// The host asked for.
        host: String,
    },
}

/// gRPC status codes the sidecar answers with (grpc/doc/statuscodes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcCode {
    /// 2: the request may have been processed; nothing more is known.
    Unknown = 2,
    /// 3: the request itself is unusable.
    InvalidArgument = 3,
    /// 4: no answer within the deadline.
    DeadlineExceeded = 4,
    /// 7: the caller may not call the service.
    PermissionDenied = 7,
    /// 8: too many requests pending.
    ResourceExhausted = 8,
    /// 13: a loop or another mesh fault.
    Internal = 13,
    /// 14: no instance, no connection, no certificate: try again later.
    Unavailable = 14,
}

impl ProxyError {
    /// The status the error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            // 503 rather than linkerd's 502 for an app that refuses
            // connections: the request certainly did not reach it, so the
            // caller's sidecar may retry it on another instance (it retries
            // 503, never 502, which may follow a request the app processed)
            // and counts it towards ejecting this one.
            ProxyError::NoHealthyInstance { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::AppUnavailable { .. }
            | ProxyError::NoCertificate { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Unreachable { .. } | ProxyError::BadGateway { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Forbidden { .. } | ProxyError::EgressDenied { .. } => StatusCode::FORBIDDEN,
            ProxyError::Loop { .. } => StatusCode::LOOP_DETECTED,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BodyStalled { .. } => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The gRPC status a gRPC caller gets instead of [`ProxyError::status`].
    pub fn grpc_code(&self) -> GrpcCode {
        match self {
            ProxyError::NoHealthyInstance { .. }
            | ProxyError::Unreachable { .. }
            | ProxyError::AppUnavailable { .. }
            | ProxyError::NoCertificate { .. } => GrpcCode::Unavailable,
            ProxyError::Overloaded { .. } => GrpcCode::ResourceExhausted,
            // Not UNAVAILABLE: clients retry that, and this call may have
            // run.
            ProxyError::BadGateway { .. } => GrpcCode::Unknown,
            ProxyError::Timeout { .. } | ProxyError::BodyStalled { .. } => {
                GrpcCode::DeadlineExceeded
            }
            ProxyError::Forbidden { .. } | ProxyError::EgressDenied { .. } => {
                GrpcCode::PermissionDenied
            }
            ProxyError::Loop { .. } => GrpcCode::Internal,
            ProxyError::BadRequest(_) | ProxyError::HeadersTooLarge { .. } => {
                GrpcCode::InvalidArgument
            }
        }
    }

    /// Whether an inbound answering with this error had passed the request
    /// to its app: only then may it have been processed.
    pub fn reached_app(&self) -> bool {
        matches!(
            self,
            ProxyError::BadGateway { .. }
                | ProxyError::Timeout { .. }
                | ProxyError::BodyStalled { .. }
        )
    }

    /// The response for a caller of `kind`: for gRPC, a trailers-only
    /// answer (HTTP 200, `grpc-status`, `grpc-message`); otherwise the
    /// HTTP status with the message as body. Both carry `x-signpost-error`.
    pub fn respond(self, kind: Caller) -> Response<ProxyBody> {
        match kind {
            Caller::Http => self.into_response(),
            Caller::Grpc => self.into_grpc_response(),
        }
    }

    /// The trailers-only gRPC answer (HTTP 200, `grpc-status`,
    /// `grpc-message`, no body), with `x-signpost-error`.
    pub fn into_grpc_response(self) -> Response<ProxyBody> {
        let message = self.to_string();
        let mut rsp = Response::new(crate::body::empty());
        let headers = rsp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(GRPC_STATUS, HeaderValue::from(self.grpc_code() as u16));
        if let Ok(v) = HeaderValue::from_str(&grpc_message(&message)) {
            headers.insert(GRPC_MESSAGE, v);
        }
        headers.insert(ERROR_HEADER, header_value(&message));
        rsp
    }

    /// The response: status, `x-signpost-error`, and the message as body.
    pub fn into_response(self) -> Response<ProxyBody> {
        let message = self.to_string();
        let header = header_value(&message);
        let text = match &self {
            ProxyError::Forbidden { why, .. } if !why.is_empty() => format!("{message}: {why}\n"),
            _ => format!("{message}\n"),
        };
        let mut rsp = Response::new(full(text));
        *rsp.status_mut() = self.status();
        rsp.headers_mut().insert(ERROR_HEADER, header);
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        rsp
    }

    /// Maps an error from a destination's service stack.
    pub fn from_stack(service: &str, err: &crate::body::BoxError, limit: usize) -> Self {
        if err.is::<crate::outbound::limit::Overloaded>() {
            return ProxyError::Overloaded {
                service: service.to_string(),
                limit,
            };
        }
        if let Some(found) = crate::outbound::endpoint::find_endpoint_error(&**err) {
            let source = match found {
                EndpointError::Connect(c) => EndpointError::Connect(clone_connect(c)),
                EndpointError::Refused { addr, reason } => EndpointError::Refused {
                    addr: *addr,
                    reason: reason.clone(),
                },
                EndpointError::Reset { .. } => {
                    return ProxyError::BadGateway {
                        service: service.to_string(),
                        reason: found.to_string(),
                    };
                }
            };
            return ProxyError::Unreachable {
                service: service.to_string(),
                source,
            };
        }
        ProxyError::BadGateway {
            service: service.to_string(),
            reason: err.to_string(),
        }
    }
}

/// Rebuilds a connect error for a message (io and h2 errors do not clone).
fn clone_connect(err: &ConnectError) -> ConnectError {
    match err {
        ConnectError::Tcp { addr, source } => ConnectError::Tcp {
            addr: *addr,
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        ConnectError::Timeout { addr, timeout } => ConnectError::Timeout {
            addr: *addr,
            timeout: *timeout,
        },
        ConnectError::Tls {
            addr,
            reason,
            source,
        } => ConnectError::Tls {
            addr: *addr,
            reason,
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        ConnectError::Http { addr, source } => ConnectError::Tls {
            addr: *addr,
            reason: "http2",
            source: std::io::Error::other(source.to_string()),
        },
    }
}

/// Who a sidecar answers, for the form of its own error answers (see
/// [`crate::headers::Head::caller`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Anything but gRPC: the HTTP status and a text body.
    Http,
    /// `content-type: application/grpc*`: a trailers-only gRPC answer.
    Grpc,
}

/// The gRPC status header (or trailer).
pub const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The gRPC status message header (or trailer).
pub const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");

/// `text` percent-encoded as `grpc-message` wants it: printable ASCII but
/// `%` as is, everything else as `%XX` of its UTF-8 bytes.
pub fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A header value from any text: characters a header cannot carry become `?`.
pub fn header_value(text: &str) -> HeaderValue {
    let clean: String = text
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("error"))
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use super::*;

    #[test]
    fn messages_read_as_the_contract_says() {
        let refused = ProxyError::Unreachable {
            service: "user".into(),
            source: EndpointError::Connect(ConnectError::Tcp {
                addr: "10.0.0.5:15006".parse().unwrap(),
                source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
            }),
        };
        assert!(
            refused
                .to_string()
                .starts_with("user: connection refused by 10.0.0.5:15006"),
            "{refused}"
        );
        assert_eq!(refused.status(), 502);
        let none = ProxyError::NoHealthyInstance {
            service: "user".into(),
            dns: None,
        };
        let rsp = none.into_response();
        assert_eq!(rsp.status(), 503);
        assert_eq!(rsp.headers()[&ERROR_HEADER], "no healthy instance of user");
        let forbidden = ProxyError::Forbidden {
            caller: "order".into(),
            service: "user".into(),
            why: String::new(),
        };
        assert_eq!(forbidden.to_string(), "order is not allowed to call user");
        let app_down = ProxyError::AppUnavailable {
            service: "user".into(),
            app: "127.0.0.1:8080".parse().unwrap(),
            reason: "Connection refused (os error 111)".into(),
        };
        assert_eq!(app_down.status(), 503, "retryable: the app never saw it");
        let rsp = app_down.into_response();
        assert_eq!(
            rsp.headers()[&ERROR_HEADER],
            "user: app at 127.0.0.1:8080: Connection refused (os error 111)"
        );
        let timeout = ProxyError::Timeout {
            service: "user".into(),
            after: Duration::from_secs(30),
        };
        assert_eq!(timeout.status(), 504);
        assert_eq!(timeout.to_string(), "user: no response within 30s");
    }

    #[test]
    fn grpc_callers_get_trailers_only_answers() {
        let cases = [
            (
                ProxyError::NoHealthyInstance {
                    service: "echo".into(),
                    dns: None,
                },
                "14",
            ),
            (
                ProxyError::Timeout {
                    service: "echo".into(),
                    after: Duration::from_secs(1),
                },
                "4",
            ),
            (
                ProxyError::Overloaded {
                    service: "echo".into(),
                    limit: 1,
                },
                "8",
            ),
            (
                ProxyError::NoCertificate {
                    reason: "CA down".into(),
                },
                "14",
            ),
            (
                ProxyError::Forbidden {
                    caller: "order".into(),
                    service: "echo".into(),
                    why: String::new(),
                },
                "7",
            ),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let rsp = err.respond(Caller::Grpc);
            assert_eq!(rsp.status(), 200);
            assert_eq!(rsp.headers()[&GRPC_STATUS], code, "{message}");
            assert_eq!(rsp.headers()[&ERROR_HEADER], message.as_str());
            assert_eq!(rsp.headers()["content-type"], "application/grpc");
            assert!(rsp.body().is_end_stream(), "trailers-only: no body");
        }
        assert_eq!(grpc_message("a 100% é"), "a 100%25 %C3%A9");
    }
}
