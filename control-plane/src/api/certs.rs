//! `POST /v1/certs` and `GET /v1/ca/roots`: workload certificates from the
//! mesh CA.
//!
//! Who gets which identity: a service token gets exactly its service's
//! identity, whatever the CSR asks for. The admin token (and, in `--dev`, a
//! loopback caller) may name any service in the body's `service` field — the
//! admin can make a token for any service anyway, so this grants nothing new
//! and lets `--dev` sidecars run without tokens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use signpost_certs::{Ca, Identity, TrustBundle};

use super::ApiState;
use super::auth::{Principal, authenticate};
use super::error::ApiError;
use super::extract::JsonBody;
use crate::model::ServiceName;
use crate::store::{Keys, Store};

/// The CA as the API uses it.
pub struct CertAuthority {
    /// The root that signs.
    pub ca: Ca,
    /// The trust zone (`xingren.host`).
    pub zone: String,
    /// Lifetime of issued certificates.
    pub cert_ttl: Duration,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("zone", &self.zone)
            .field("cert_ttl", &self.cert_ttl)
            .finish()
    }
}

impl CertAuthority {
    /// Publishes this CA's root under `<prefix>ca/roots/<sha256>` so that
    /// every replica's `/v1/ca/roots` serves the union of the roots in use
    /// (several during a CA rotation).
    pub async fn publish_root(&self, store: &dyn Store, keys: &Keys) -> Result<(), ApiError> {
        let pem = self.ca.cert_pem();
        let key = format!(
            "{}roots/{}",
            keys.ca(),
            hex::encode(Sha256::digest(pem.as_bytes()))
        );
        store.put(&key, pem.into_bytes(), None).await?;
        Ok(())
    }
}

/// `POST /v1/certs` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRequest {
    /// The workload's CSR, PEM.
    pub csr: String,
    /// The service to issue for: only the admin may name one; a service
    /// token may omit it or name its own service.
    #[serde(default)]
    pub service: Option<ServiceName>,
}

/// `POST /v1/certs` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertReply {
    /// PEM chain, workload certificate first.
    pub certificate: String,
    /// Its expiry, RFC 3339.
    #[serde(with = "humantime_serde")]
    pub expires: SystemTime,
    /// The identity it carries (`spiffe://<zone>/svc/<service>`).
    pub identity: String,
}

fn no_ca() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_ca",
        "this control plane has no CA: start `signpost server` with --ca-dir DIR (make one with `signpost ca init --dir DIR`)",
    )
}

fn ca_of(state: &ApiState) -> Result<&Arc<CertAuthority>, ApiError> {
    state.ca.as_ref().ok_or_else(no_ca)
}

/// `POST /v1/certs`.
pub async fn issue(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CertRequest>,
) -> Result<Json<CertReply>, ApiError> {
    let ca = ca_of(&state)?;
    let principal = authenticate(&state, &headers, peer).await?;
    let service = match (principal, req.service) {
        (Principal::Service(own), None) => own,
        (Principal::Service(own), Some(asked)) if asked == own => own,
        (Principal::Service(own), Some(asked)) => {
            return Err(ApiError::forbidden(format!(
                "this token belongs to service {own} and cannot get a certificate for {asked}"
            )));
        }
        (Principal::Admin, Some(asked)) => asked,
        (Principal::Admin, None) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "the admin token has no identity of its own: name the service in \"service\", \
                 or use that service's token",
            ));
        }
    };
    let identity = Identity::new(service.as_str(), &ca.zone)
        .map_err(|e| ApiError::bad_request("invalid_name", e.to_string()))?;
    let issued = ca
        .ca
        .sign_csr(&req.csr, &identity, ca.cert_ttl)
        .map_err(|err| {
            if err.is_bad_request() {
                ApiError::bad_request("invalid_csr", err.to_string())
            } else {
                tracing::error!(%err, "signing failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "signing_failed",
                    err.to_string(),
                )
            }
        })?;
    tracing::info!(identity = %identity.uri(), expires = %humantime::format_rfc3339_seconds(issued.expires), "certificate issued");
    Ok(Json(CertReply {
        certificate: issued.chain_pem,
        expires: issued.expires,
        identity: identity.uri(),
    }))
}

/// `GET /v1/ca/roots`: the trust bundle, PEM. Every root published in the
/// store, plus this replica's own (so it answers while etcd is down).
pub async fn roots(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let ca = ca_of(&state)?;
    let mut bundle = ca.ca.trust_bundle();
    match state
        .store
        .range(&format!("{}roots/", state.keys.ca()))
        .await
    {
        Ok(range) => {
            for kv in range.kvs {
                match std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|pem| TrustBundle::from_pem(pem).ok())
                {
                    Some(other) => bundle.merge(&other),
                    None => tracing::warn!(key = %kv.key, "ignoring unreadable CA root"),
                }
            }
        }
        Err(err) => {
            tracing::warn!(%err, "serving only this replica's root: the store is unreachable")
        }
    }
    Ok((
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        bundle.to_pem(),
    )
        .into_response())
}
