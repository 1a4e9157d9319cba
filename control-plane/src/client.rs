//! A typed client of the HTTP API, used by the CLI and the sidecar.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::services::{HealthReport, HeartbeatReply, ServiceList, ServiceView};
use crate::api::{TokenList, TokenReply, TokenRequest};
use crate::model::{Instance, InstanceId, Registration, ServiceConfig, ServiceName};

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control plane could not be reached at all.
    #[error("cannot reach the control plane at {url}: {reason} — is `signpost server` running?")]
    Unreachable {
        /// The base URL.
        url: String,
        /// The innermost cause ("Connection refused").
        reason: String,
    },
    /// The control plane answered with an error.
    #[error("{message} ({status} {code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error code from the body.
        code: String,
        /// The error message from the body.
        message: String,
    },
    /// The answer could not be read.
    #[error("unexpected answer from the control plane: {0}")]
    Decode(String),
    /// The base URL is not usable.
    #[error("invalid control plane URL {0:?}: expected http://host:port")]
    InvalidUrl(String),
}

impl ClientError {
    /// The HTTP status, for API errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error: ErrorInner,
}

#[derive(serde::Deserialize)]
struct ErrorInner {
    code: String,
    message: String,
}

/// A client of one control plane.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

fn innermost(err: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = err;
    while let Some(next) = source.source() {
        source = next;
    }
    let text = source.to_string();
    if err.is_timeout() {
        format!("no answer in time ({text})")
    } else {
        text
    }
}

impl Client {
    /// A client of the control plane at `base` (`http://127.0.0.1:8500`).
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::InvalidUrl(base));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            // Under the server's 10 s idle timeout, so a pooled connection
            // is not reused just as the server closes it.
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(Self {
            base,
            token: token.filter(|t| !t.trim().is_empty()),
            http,
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<(T, Option<i64>), ClientError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.timeout(timeout).send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() || e.is_request() {
                ClientError::Unreachable {
                    url: self.base.clone(),
                    reason: innermost(&e),
                }
            } else {
                ClientError::Decode(innermost(&e))
            }
        })?;
        let status = resp.status();
        let index = resp
            .headers()
            .get(crate::api::INDEX_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Decode(innermost(&e)))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => ClientError::Api {
                    status: status.as_u16(),
                    code: body.error.code,
                    message: body.error.message,
                },
                Err(_) => ClientError::Api {
                    status: status.as_u16(),
                    code: "http".into(),
                    message: String::from_utf8_lossy(&bytes).trim().to_string(),
                },
            });
        }
        // 204 answers have no body; let `()`-like targets read `null`.
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        let value =
            serde_json::from_slice(bytes).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok((value, index))
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn put_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let req = self.http.put(self.url(path)).json(body);
        Ok(self.call(req, Self::TIMEOUT).await?.0)
    }

    /// Registers (or replaces) an instance.
    pub async fn register(
        &self,
        svc: &ServiceName,
        id: &InstanceId,
        registration: &Registration,
    ) -> Result<Instance, ClientError> {
        self.put_json(&format!("/v1/services/{svc}/instances/{id}"), registration)
            .await
    }

    /// Renews an instance's TTL. A 404 means it expired: register again.
    pub async fn heartbeat(
        &self,
        svc: &ServiceName,
        id: &InstanceId,
    ) -> Result<HeartbeatReply, ClientError> {
        let req = self
            .http
            .put(self.url(&format!("/v1/services/{svc}/instances/{id}/heartbeat")));
        Ok(self.call(req, Self::TIMEOUT).await?.0)
    }

    /// Reports an instance's health (what a sidecar's app probe saw).
    pub async fn report_health(
        &self,
        svc: &ServiceName,
        id: &InstanceId,
        report: &HealthReport,
    ) -> Result<(), ClientError> {
        let req = self
            .http
            .put(self.url(&format!("/v1/services/{svc}/instances/{id}/health")))
            .json(report);
        let _: Option<serde_json::Value> = self.call(req, Self::TIMEOUT).await?.0;
        Ok(())
    }

    /// Deregisters an instance.
    pub async fn deregister(&self, svc: &ServiceName, id: &InstanceId) -> Result<(), ClientError> {
        let req = self
            .http
            .delete(self.url(&format!("/v1/services/{svc}/instances/{id}")));
        let _: Option<serde_json::Value> = self.call(req, Self::TIMEOUT).await?.0;
        Ok(())
    }

    /// Lists services.
    pub async fn services(&self) -> Result<ServiceList, ClientError> {
        let req = self.http.get(self.url("/v1/services"));
        Ok(self.call(req, Self::TIMEOUT).await?.0)
    }

    /// Reads a service; with `index`, blocks until it changes past `index`
    /// or `wait` passes.
    pub async fn service(
        &self,
        svc: &ServiceName,
        index: Option<i64>,
        wait: Duration,
    ) -> Result<ServiceView, ClientError> {
        let mut req = self.http.get(self.url(&format!("/v1/services/{svc}")));
        if let Some(index) = index {
            req = req.query(&[
                ("index", index.to_string()),
                ("wait", format!("{}ms", wait.as_millis())),
            ]);
        }
        Ok(self.call(req, wait + Self::TIMEOUT).await?.0)
    }

    /// Writes a service's settings.
    pub async fn put_config(
        &self,
        svc: &ServiceName,
        config: &ServiceConfig,
    ) -> Result<ServiceConfig, ClientError> {
        self.put_json(&format!("/v1/services/{svc}/config"), config)
            .await
    }

    /// Creates a service token (admin), valid for `ttl` (`"720h"`) or
    /// until revoked.
    pub async fn create_token(
        &self,
        svc: &ServiceName,
        ttl: Option<String>,
    ) -> Result<TokenReply, ClientError> {
        let req = self.http.post(self.url("/v1/tokens")).json(&TokenRequest {
            service: svc.clone(),
            ttl,
        });
        Ok(self.call(req, Self::TIMEOUT).await?.0)
    }

    /// Lists service tokens (admin): accessors, never the tokens.
    pub async fn list_tokens(&self) -> Result<TokenList, ClientError> {
        let req = self.http.get(self.url("/v1/tokens"));
        Ok(self.call(req, Self::TIMEOUT).await?.0)
    }

    /// Revokes the token with `accessor` (admin).
    pub async fn revoke_token(&self, accessor: &str) -> Result<(), ClientError> {
        let req = self
            .http
            .delete(self.url(&format!("/v1/tokens/{accessor}")));
        let _: Option<serde_json::Value> = self.call(req, Self::TIMEOUT).await?.0;
        Ok(())
    }
}
