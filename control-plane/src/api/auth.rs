//! Who is calling: the admin, a service's token, or (in `--dev`) anyone on
//! loopback.

use std::net::SocketAddr;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;

use super::error::ApiError;
use crate::model::{ServiceName, TokenRecord};
use crate::store::{Keys, Store};
use crate::tokens;

/// How the server checks tokens.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Hash of the admin token, if one was configured.
    pub admin_hash: Option<String>,
    /// `--dev`: writes from loopback need no token.
    pub dev: bool,
}

impl AuthConfig {
    /// Reads the admin token from `token` (the contents of
    /// `--admin-token-file`).
    pub fn with_admin_token(token: &str, dev: bool) -> Self {
        Self {
            admin_hash: Some(tokens::hash(token)),
            dev,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The admin token, or a loopback caller in `--dev`.
    Admin,
    /// A service token.
    Service(ServiceName),
}

impl Principal {
    /// Whether this caller may write `svc`'s registrations and settings.
    pub fn may_write(&self, svc: &ServiceName) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Service(own) if own == svc => Ok(()),
            Principal::Service(own) => Err(ApiError::forbidden(format!(
                "this token belongs to service {own} and may not act for {svc}"
            ))),
        }
    }

    /// Requires the admin.
    pub fn must_be_admin(&self, what: &str) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Service(own) => Err(ApiError::forbidden(format!(
                "{what} needs the admin token; this token belongs to service {own}"
            ))),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(ApiError::unauthorized(
            "the Authorization header must be `Bearer <token>`",
        )),
    }
}

/// Identifies the caller of a write.
pub async fn authenticate(
    config: &AuthConfig,
    store: &dyn Store,
    keys: &Keys,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Principal, ApiError> {
    let Some(token) = bearer(headers)? else {
        if config.dev && peer.ip().is_loopback() {
            return Ok(Principal::Admin);
        }
        return Err(ApiError::unauthorized(
            "this request needs a token: send `Authorization: Bearer <token>` \
             (the admin makes one with `signpost token create --service <name>`)",
        ));
    };
    let hash = tokens::hash(token);
    if let Some(admin) = &config.admin_hash
        && tokens::hashes_equal(admin, &hash)
    {
        return Ok(Principal::Admin);
    }
    match store.get(&keys.token(&hash)).await? {
        Some(kv) => {
            let record: TokenRecord = serde_json::from_slice(&kv.value).map_err(|err| {
                tracing::error!(%err, "unreadable token record");
                ApiError::unauthorized("this token's record is unreadable; create a new token")
            })?;
            Ok(Principal::Service(record.service))
        }
        None => Err(ApiError::unauthorized("unknown token")),
    }
}
