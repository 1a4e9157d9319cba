//! A JSON body extractor whose rejections are API errors (400 with the
//! parser's reason, 413 past the body limit, 415 without a JSON body).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON body, parsed strictly (types with `deny_unknown_fields` refuse
/// unknown keys).
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!(
                        "the request body is larger than {} bytes",
                        super::BODY_LIMIT
                    ),
                )
            } else {
                ApiError::bad_request("invalid_body", rejection.body_text())
            }
        })?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_body",
                "the request needs a JSON body",
            ));
        }
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|err| {
            ApiError::bad_request("invalid_body", format!("invalid JSON body: {err}"))
        })
    }
}
