//! API errors: `{"error": {"code": "...", "message": "..."}}` with a status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::model::{NameError, ValidationError};
use crate::store::StoreError;

/// An error answered to an API client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable machine-readable code (`invalid_name`, `unauthorized`, ...).
    pub code: &'static str,
    /// A sentence a person can act on.
    pub message: String,
    /// Seconds for a `Retry-After` header (429).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    /// Builds an error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After` of `secs` seconds.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// 400 for a body or parameter that cannot be used.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        resp
    }
}

impl From<NameError> for ApiError {
    fn from(err: NameError) -> Self {
        Self::bad_request("invalid_name", err.to_string())
    }
}

impl From<ValidationError> for ApiError {
    fn from(err: ValidationError) -> Self {
        let code = match err {
            ValidationError::Name(_) => "invalid_name",
            ValidationError::CheckTarget(..) | ValidationError::CheckKind => "check_target",
            _ => "invalid_registration",
        };
        Self::bad_request(code, err.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(_) | StoreError::Timeout(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("{err}; nothing was changed, retry when etcd is back"),
            ),
            StoreError::LeaseNotFound(_) => Self::not_found(err.to_string()),
            StoreError::Compacted { .. } | StoreError::TooLarge(_) | StoreError::Other(_) => {
                tracing::error!(%err, "store error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_error",
                    err.to_string(),
                )
            }
        }
    }
}

/// Most header bytes a request may carry (names, values and their
/// separators). Consul and nginx allow a few KiB per header; 16 KiB in all
/// leaves room for long bearer tokens while answering a header flood with a
/// clear 431 from the API rather than from the HTTP layer.
pub const HEADER_LIMIT: usize = 16 * 1024;

/// Most headers a request may carry.
pub const MAX_HEADERS: usize = 100;

/// Refuses requests whose headers are past [`HEADER_LIMIT`] or
/// [`MAX_HEADERS`] with 431 `headers_too_large`.
pub async fn limit_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if bytes > HEADER_LIMIT || headers.len() > MAX_HEADERS {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request has {} headers of {bytes} bytes: the limit is {MAX_HEADERS} headers and {HEADER_LIMIT} bytes",
                headers.len()
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// Gives every error answer the contract's shape: responses made outside the
/// handlers (axum's 405, the body limit's 413, the timeout's 503, an
/// extractor's plain-text 400) come out as `{"error": {"code", "message"}}`
/// like the handlers' own errors.
pub async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // These bodies are short texts made by axum or tower-http.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(axum::http::header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            (
                "method_not_allowed",
                format!("{method} is not allowed on {path}; allowed: {allowed}"),
            )
        }
        StatusCode::PAYLOAD_TOO_LARGE => (
            "body_too_large",
            format!(
                "the request body is larger than {} bytes",
                super::BODY_LIMIT
            ),
        ),
        StatusCode::SERVICE_UNAVAILABLE if text.is_empty() => (
            "timeout",
            format!(
                "the request took longer than {:?}; nothing is known to have changed, retry",
                super::REQUEST_TIMEOUT
            ),
        ),
        StatusCode::REQUEST_TIMEOUT => ("timeout", "the request took too long".to_string()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            if text.is_empty() {
                "send the body as application/json".to_string()
            } else {
                text
            },
        ),
        StatusCode::BAD_REQUEST => ("invalid_request", text),
        StatusCode::NOT_FOUND => ("not_found", text),
        s if s.is_server_error() => ("internal", text),
        _ => ("error", text),
    };
    let message = if message.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string()
    } else {
        message
    };
    let mut answer = ApiError::new(status, code, message).into_response();
    // Keep `Allow`, `Retry-After` and the like.
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            answer.headers_mut().append(name.clone(), value.clone());
        }
    }
    answer
}
