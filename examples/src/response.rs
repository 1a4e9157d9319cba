//! JSON answers and errors, shaped like Signpost's own API errors:
//! `{"error": {"code": "...", "message": "..."}}`, with extra fields where a
//! person needs them (the upstream's status in `order`'s 502).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;
use serde_json::{Map, Value, json};

/// The body type every handler answers with.
pub type Body = Full<Bytes>;

/// A `200 OK` (or `status`) response with `value` as JSON.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            with_type(status, body, "application/json")
        }
        // Only a map with non-string keys or a failing Serialize impl can get
        // here; none of ours do, but a response is still owed.
        Err(err) => with_type(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "{{\"error\":{{\"code\":\"internal\",\"message\":\"cannot encode JSON: {err}\"}}}}\n"
            ),
            "application/json",
        ),
    }
}

/// A plain-text response (`/health`).
pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    with_type(status, body, "text/plain; charset=utf-8")
}

fn with_type(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Body> {
    let mut rsp = Response::new(Full::new(body.into()));
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    rsp
}

/// An error answer: `{"error": {"code", "message", ...extra}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable, machine-readable code (`invalid_id`, `not_found`, ...).
    pub code: &'static str,
    /// One line for a person.
    pub message: String,
    /// More fields inside `error`, e.g. `upstream_status`.
    pub extra: Map<String, Value>,
}

impl ApiError {
    /// An error with no extra fields.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }

    /// 404 for a path no route matches.
    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such resource: {path}"),
        )
    }

    /// 405 for a known path and another method than GET.
    pub fn method_not_allowed(method: &http::Method) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed here; use GET"),
        )
    }

    /// Adds a field to the error object.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    /// The response.
    pub fn into_response(self) -> Response<Body> {
        let mut error = Map::new();
        error.insert("code".into(), json!(self.code));
        error.insert("message".into(), json!(self.message));
        error.extend(self.extra);
        let mut rsp = json(self.status, &json!({ "error": error }));
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            rsp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        rsp
    }
}

/// Parses the `{id}` of a path as a non-negative integer, or says why not
/// (400 `invalid_id`).
pub fn parse_id(what: &str, raw: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>().map_err(|_| {
        // `raw` comes from the network: show it escaped and bounded.
        let shown: String = raw.chars().take(64).collect();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!(
                "{what} id {shown:?} is not a number (expected 0 to {})",
                u64::MAX
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(rsp: Response<Body>) -> Value {
        let bytes = rsp.into_body().collect().await.map(|c| c.to_bytes());
        serde_json::from_slice(&bytes.unwrap_or_default()).unwrap_or(Value::Null)
    }

    #[tokio::test]
    async fn errors_have_code_message_and_extra_fields() {
        let rsp = ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", "boom")
            .with("upstream_status", 503)
            .into_response();
        assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(rsp.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            body_json(rsp).await,
            json!({"error": {"code": "upstream_error", "message": "boom", "upstream_status": 503}})
        );
    }

    #[test]
    fn ids_must_be_non_negative_integers() {
        assert_eq!(parse_id("user", "7"), Ok(7));
        for bad in ["", "-1", "abc", "7.5", "18446744073709551616", " 7"] {
            let err = parse_id("user", bad).expect_err(bad);
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(err.code, "invalid_id");
        }
    }

    #[test]
    fn a_long_bad_id_is_cut_in_the_message() {
        let long = "x".repeat(10_000);
        let err = parse_id("user", &long).expect_err("not a number");
        assert!(err.message.len() < 200, "{}", err.message);
    }
}
