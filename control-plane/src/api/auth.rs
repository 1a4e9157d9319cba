//! Who is calling: the admin, a service's token, or (in `--dev`) anyone on
//! loopback; and how many times a client IP may fail to say.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use tokio::time::Instant;

use super::ApiState;
use super::error::ApiError;
use crate::model::ServiceName;
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

/// Failed authentications a client IP may make in a burst, and how fast
/// it earns them back: 10, then one a second (60 a minute), which no person
/// mistyping a token meets and which makes guessing a 256-bit token
/// hopeless rather than merely expensive.
pub const FAILURE_BURST: f64 = 10.0;
/// See [`FAILURE_BURST`].
pub const FAILURES_PER_SECOND: f64 = 1.0;

/// Clients tracked at most; past it, the clients whose allowance is full
/// again are forgotten (they are no different from new ones).
const MAX_TRACKED: usize = 10_000;

/// Failed authentications per client IP, as token buckets.
#[derive(Debug, Default)]
pub struct AuthFailures {
    /// Allowance left and when it was counted, per client.
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl AuthFailures {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    fn level(entry: (f64, Instant), now: Instant) -> f64 {
        (entry.0 + now.duration_since(entry.1).as_secs_f64() * FAILURES_PER_SECOND)
            .min(FAILURE_BURST)
    }

    /// The client an address counts for: an IPv6 client usually holds a
    /// whole /64, so its addresses share one allowance.
    fn client(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::from(octets)
            }
            v4 => v4,
        }
    }

    /// `Err(retry_after)` while `ip` has used up its failures.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let ip = Self::client(ip);
        let buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        match buckets.get(&ip) {
            Some(&entry) => {
                let level = Self::level(entry, Instant::now());
                if level >= 1.0 {
                    Ok(())
                } else {
                    Err(Duration::from_secs_f64((1.0 - level) / FAILURES_PER_SECOND))
                }
            }
            None => Ok(()),
        }
    }

    /// Counts one failure of `ip`.
    pub fn fail(&self, ip: IpAddr) {
        let ip = Self::client(ip);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&ip) {
            buckets.retain(|_, e| Self::level(*e, now) < FAILURE_BURST);
            if buckets.len() >= MAX_TRACKED {
                // Failing from this many clients at once: memory stays
                // bounded, at the price of those clients' counts.
                tracing::warn!(
                    clients = buckets.len(),
                    "too many clients failing authentication; forgetting their counts"
                );
                buckets.clear();
            }
        }
        let level = buckets
            .get(&ip)
            .map_or(FAILURE_BURST, |&e| Self::level(e, now));
        buckets.insert(ip, ((level - 1.0).max(0.0), now));
    }
}

fn too_many(retry_after: Duration) -> ApiError {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_failures",
        format!(
            "too many failed authentications from this address: retry in {secs}s \
             (at most {FAILURE_BURST} in a row, then {FAILURES_PER_SECOND} a second)"
        ),
    )
    .with_retry_after(secs.max(1))
}

/// Identifies the caller. Tokens are checked against [`TokenCache`], never
/// the store; a client whose recent attempts failed too often gets 429 with
/// `Retry-After` before its token is looked at.
pub async fn authenticate(
    state: &ApiState,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Principal, ApiError> {
    let config = &state.auth;
    let failures = &state.auth_failures;
    let ip = peer.ip();
    failures.check(ip).map_err(too_many)?;
    let token = match bearer(headers) {
        Ok(Some(token)) => token,
        Ok(None) => {
            if config.dev && ip.is_loopback() {
                return Ok(Principal::Admin);
            }
            return Err(ApiError::unauthorized(
                "this request needs a token: send `Authorization: Bearer <token>` \
                 (the admin makes one with `signpost token create --service <name>`)",
            ));
        }
        Err(err) => {
            failures.fail(ip);
            return Err(err);
        }
    };
    let hash = tokens::hash(token);
    if let Some(admin) = &config.admin_hash
        && tokens::hashes_equal(admin, &hash)
    {
        return Ok(Principal::Admin);
    }
    match state.tokens.get(&hash) {
        Some(record) if record.expires.is_some_and(|e| e <= SystemTime::now()) => {
            failures.fail(ip);
            Err(ApiError::unauthorized(format!(
                "this token (accessor {}) expired: ask the admin for a new one",
                record.accessor
            )))
        }
        Some(record) => Ok(Principal::Service(record.service)),
        None if !state.tokens.is_synced() => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "service tokens are not loaded from etcd yet; retry shortly",
        )),
        None => {
            failures.fail(ip);
            Err(ApiError::unauthorized("unknown token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failures_are_limited_per_client_and_earned_back() {
        let failures = AuthFailures::new();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..10 {
            assert!(failures.check(a).is_ok());
            failures.fail(a);
        }
        let wait = failures.check(a).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(failures.check(b).is_ok(), "another client is not limited");
        tokio::time::advance(wait).await;
        assert!(failures.check(a).is_ok());
        failures.fail(a);
        assert!(failures.check(a).is_err(), "one earned back, one spent");
        // Addresses of one IPv6 /64 share an allowance.
        for i in 0..10 {
            failures.fail(format!("2001:db8::{i}").parse().unwrap());
        }
        assert!(failures.check("2001:db8::ffff".parse().unwrap()).is_err());
        assert!(failures.check("2001:db8:0:1::1".parse().unwrap()).is_ok());
    }
}
