//! The `user` service: made-up users, each answer naming the instance that
//! served it.
//!
//! | request | answer |
//! |---|---|
//! | `GET /users/{id}` | 200 `{"id": 7, "name": "user-7", "served_by": "<instance>", "caller": "order"}` (`caller` from the sidecar's `x-signpost-caller`, when present) |
//! | `GET /users/abc` | 400 `{"error": {"code": "invalid_id", ...}}` |
//! | `GET /health` | 200 `ok` |
//! | anything else | 404 (405 for another method on a known path), JSON error |

use http::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::response::{ApiError, Body, json, parse_id, text};
use crate::serve::Handler;

/// A user, as `GET /users/{id}` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The id asked for.
    pub id: u64,
    /// `user-<id>`.
    pub name: String,
    /// The instance id of the process that answered.
    pub served_by: String,
    /// The calling service as the sidecar verified it from the caller's
    /// mTLS certificate (`x-signpost-caller`); absent for direct calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
}

/// The `user` service's routes.
#[derive(Debug, Clone)]
pub struct UserService {
    instance: String,
}

impl UserService {
    /// A service answering as instance `instance`.
    pub fn new(instance: impl Into<String>) -> Self {
        Self {
            instance: instance.into(),
        }
    }

    /// The user with `id`: every id exists, so any instance can answer any
    /// request and the demo shows pure balancing.
    pub fn user(&self, id: u64) -> User {
        User {
            id,
            name: format!("user-{id}"),
            served_by: self.instance.clone(),
            caller: None,
        }
    }

    fn route(
        &self,
        method: &Method,
        path: &str,
        caller: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        let user_id = match segments[..] {
            ["health"] => None,
            ["users", raw] if !raw.is_empty() => Some(raw),
            _ => return Err(ApiError::not_found(path)),
        };
        if method != Method::GET && method != Method::HEAD {
            return Err(ApiError::method_not_allowed(method));
        }
        match user_id {
            None => Ok(text(StatusCode::OK, "ok")),
            Some(raw) => {
                let mut user = self.user(parse_id("user", raw)?);
                user.caller = caller.map(str::to_string);
                Ok(json(StatusCode::OK, &user))
            }
        }
    }
}

impl Handler for UserService {
    async fn handle(&self, req: Request<()>) -> Response<Body> {
        let caller = req
            .headers()
            .get("x-signpost-caller")
            .and_then(|v| v.to_str().ok());
        self.route(req.method(), req.uri().path(), caller)
            .unwrap_or_else(ApiError::into_response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use serde_json::{Value, json};

    async fn get(method: Method, path: &str) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .expect("request");
        let rsp = UserService::new("u1").handle(req).await;
        let status = rsp.status();
        let bytes = rsp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }

    #[tokio::test]
    async fn a_user_names_the_instance_that_served_it() {
        assert_eq!(
            get(Method::GET, "/users/7").await,
            (
                StatusCode::OK,
                json!({"id": 7, "name": "user-7", "served_by": "u1"})
            )
        );
    }

    #[tokio::test]
    async fn health_is_ok() {
        assert_eq!(
            get(Method::GET, "/health").await,
            (StatusCode::OK, json!("ok"))
        );
    }

    #[tokio::test]
    async fn a_non_numeric_id_is_a_400_with_a_json_error() {
        let (status, body) = get(Method::GET, "/users/abc").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_id");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("\"abc\"")),
            "{body}"
        );
    }

    #[tokio::test]
    async fn unknown_paths_are_404_with_a_json_error() {
        for path in ["/", "/users", "/users/", "/users/7/orders", "/nope"] {
            let (status, body) = get(Method::GET, path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(body["error"]["code"], "not_found", "{path}");
        }
    }

    #[tokio::test]
    async fn other_methods_are_405() {
        let (status, body) = get(Method::POST, "/users/7").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body["error"]["code"], "method_not_allowed");
    }
}
