//! `/v1/services/...`: register, heartbeat, deregister, list, get (with
//! blocking queries), service settings and health reports.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::auth::{Principal, authenticate};
use super::error::ApiError;
use super::extract::JsonBody;
use super::{ApiState, INDEX_HEADER};
use crate::catalog::{InstanceEntry, Snapshot};
use crate::model::{
    HealthStatus, Instance, InstanceId, Registration, ServiceConfig, ServiceName, Text,
};
use crate::store::StoreError;

/// Longest a blocking query may wait (Consul's cap is 10 minutes; 5 keeps
/// idle connections through proxies with shorter idle timeouts).
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// Wait when `index` is given without `wait`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

fn names(svc: &str, id: &str) -> Result<(ServiceName, InstanceId), ApiError> {
    Ok((ServiceName::new(svc)?, InstanceId::new(id)?))
}

async fn principal(
    state: &ApiState,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Principal, ApiError> {
    authenticate(state, headers, peer).await
}

/// An instance as the API shows it: the record plus its health.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceView {
    /// The instance record.
    #[serde(flatten)]
    pub instance: Instance,
    /// Its health (`passing` without a check; with one, `critical` until a
    /// probe passes).
    pub health: HealthView,
}

/// Health as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthView {
    /// Passing or critical.
    pub status: HealthStatus,
    /// What the last probe saw, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    /// Since when, if a check has reported.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub since: Option<SystemTime>,
}

impl From<&InstanceEntry> for InstanceView {
    fn from(e: &InstanceEntry) -> Self {
        Self {
            instance: Instance::clone(&e.instance),
            health: HealthView {
                status: e.status(),
                output: match (&e.health, &e.instance.check) {
                    (Some(h), _) => h.output.clone(),
                    (None, Some(_)) => "no probe has passed yet".to_string(),
                    (None, None) => String::new(),
                },
                since: e.health.as_ref().map(|h| h.since),
            },
        }
    }
}

/// `GET /v1/services/{svc}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceView {
    /// The service.
    pub service: ServiceName,
    /// The blocking-query index.
    pub index: i64,
    /// Its settings, if any were written.
    #[serde(default)]
    pub config: Option<ServiceConfig>,
    /// Every instance, healthy or not, in id order.
    pub instances: Vec<InstanceView>,
}

/// One row of `GET /v1/services`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// The service.
    pub name: ServiceName,
    /// Healthy instances.
    pub healthy: usize,
    /// All instances.
    pub total: usize,
    /// Every tag any instance carries.
    pub tags: Vec<String>,
}

/// `GET /v1/services`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceList {
    /// Catalog revision.
    pub index: i64,
    /// Services in name order.
    pub services: Vec<ServiceSummary>,
}

/// How long a write waits for the catalog watch to show it.
const READ_YOUR_WRITES: Duration = Duration::from_secs(1);

/// Read-your-writes: a write answers once the catalog (and so the API's
/// reads and DNS in this process) shows it, or after [`READ_YOUR_WRITES`]
/// when the watch lags; the write itself has succeeded either way.
async fn visible(state: &ApiState, svc: &ServiceName, done: impl Fn(&Snapshot) -> bool) {
    if !state
        .catalog
        .wait_service(svc, READ_YOUR_WRITES, done)
        .await
    {
        tracing::debug!("the catalog watch did not show a write within {READ_YOUR_WRITES:?}");
    }
}

fn with_index(index: i64, body: impl IntoResponse) -> Response {
    let mut resp = body.into_response();
    if let Ok(v) = HeaderValue::from_str(&index.to_string()) {
        resp.headers_mut().insert(INDEX_HEADER, v);
    }
    resp
}

/// `PUT /v1/services/{svc}/instances/{id}`: register or replace.
pub async fn register(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((svc, id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Registration>,
) -> Result<Response, ApiError> {
    let (svc, id) = names(&svc, &id)?;
    principal(&state, &headers, peer).await?.may_write(&svc)?;
    let instance = body.validate(&svc, &id)?;
    check_target_allowed(&state, &instance)?;
    let key = state.keys.instance(&svc, &id);
    let value = serde_json::to_vec(&instance)
        .map_err(|e| ApiError::bad_request("invalid_registration", e.to_string()))?;

    let previous = state.store.get(&key).await?;
    let lease = match instance.ttl {
        Some(ttl) => Some(state.store.grant_lease(ttl).await?),
        None => None,
    };
    let revision = state.store.put(&key, value, lease).await?;
    // The old lease now holds at most the old health record; drop it so a
    // re-registration does not leave a stale lease (and health) behind.
    if let Some(old) = previous.and_then(|kv| kv.lease)
        && Some(old) != lease
        && let Err(err) = state.store.revoke_lease(old).await
    {
        tracing::warn!(%err, lease = old, "could not revoke the previous registration's lease");
    }
    tracing::info!(service = %svc, id = %id, address = %instance.address, port = instance.port, ttl = ?instance.ttl, "registered");
    visible(&state, &svc, |snap| snap.revision >= revision).await;
    Ok(with_index(revision, Json(instance)))
}

/// A check probes its own instance, or a network the server allows
/// (`--check-allow`): otherwise a token could have the control plane probe
/// anything it can reach, and publish the result.
fn check_target_allowed(state: &ApiState, instance: &Instance) -> Result<(), ApiError> {
    let Some(check) = &instance.check else {
        return Ok(());
    };
    let target = match &check.target {
        crate::model::CheckTarget::Http(t) | crate::model::CheckTarget::Tcp(t) => t,
    };
    match check.target.ip() {
        Some(ip) if ip == instance.address => Ok(()),
        Some(ip) if state.policy.check_allow.iter().any(|net| net.contains(&ip)) => Ok(()),
        _ => Err(ApiError::bad_request(
            "check_target",
            format!(
                "check target {target} is not the instance's address {}: a check probes its own instance \
                 (give a path like \"/health\" or \":PORT\"), unless the server allows other networks with --check-allow",
                instance.address
            ),
        )),
    }
}

/// Answer of a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The TTL the lease was renewed to (absent for persistent instances).
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
}

/// `PUT /v1/services/{svc}/instances/{id}/heartbeat`: renew the lease.
pub async fn heartbeat(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((svc, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<HeartbeatReply>, ApiError> {
    let (svc, id) = names(&svc, &id)?;
    principal(&state, &headers, peer).await?.may_write(&svc)?;
    let gone = || {
        ApiError::not_found(format!(
            "instance {id} of {svc} is not registered (its ttl may have expired): register it again"
        ))
    };
    let kv = state
        .store
        .get(&state.keys.instance(&svc, &id))
        .await?
        .ok_or_else(gone)?;
    let Some(lease) = kv.lease else {
        // A persistent registration has nothing to renew.
        return Ok(Json(HeartbeatReply { ttl: None }));
    };
    match state.store.keep_alive(lease).await {
        Ok(ttl) => Ok(Json(HeartbeatReply { ttl: Some(ttl) })),
        Err(StoreError::LeaseNotFound(_)) => Err(gone()),
        Err(err) => Err(err.into()),
    }
}

/// `DELETE /v1/services/{svc}/instances/{id}`: deregister.
pub async fn deregister(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((svc, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (svc, id) = names(&svc, &id)?;
    principal(&state, &headers, peer).await?.may_write(&svc)?;
    let key = state.keys.instance(&svc, &id);
    let kv = state.store.get(&key).await?;
    let deleted = state
        .store
        .delete(&[key, state.keys.health(&svc, &id)])
        .await?;
    if let Some(lease) = kv.and_then(|kv| kv.lease)
        && let Err(err) = state.store.revoke_lease(lease).await
    {
        tracing::warn!(%err, lease, "could not revoke a deregistered instance's lease");
    }
    if deleted == 0 {
        return Err(ApiError::not_found(format!(
            "instance {id} of {svc} is not registered"
        )));
    }
    tracing::info!(service = %svc, id = %id, "deregistered");
    visible(&state, &svc, |snap| {
        snap.service(&svc)
            .is_none_or(|s| !s.instances.contains_key(&id))
    })
    .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A health report from a sidecar (`PUT .../{id}/health`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthReport {
    /// Passing or critical.
    pub status: HealthStatus,
    /// What the probe saw.
    #[serde(default)]
    pub output: String,
}

/// `PUT /v1/services/{svc}/instances/{id}/health`: a sidecar reports its
/// app's health. Written only while the instance exists, under its lease.
pub async fn report_health(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((svc, id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(report): JsonBody<HealthReport>,
) -> Result<StatusCode, ApiError> {
    let (svc, id) = names(&svc, &id)?;
    principal(&state, &headers, peer).await?.may_write(&svc)?;
    let snap = state.catalog.snapshot();
    let current = snap
        .service(&svc)
        .and_then(|s| s.instances.get(&id))
        .and_then(|e| e.health.clone());
    let written = crate::health::write(
        &*state.store,
        &state.keys,
        &svc,
        &id,
        report.status,
        report.output,
        current,
    )
    .await?;
    if written {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "instance {id} of {svc} is not registered"
        )))
    }
}

/// Query of `GET /v1/services/{svc}`, as sent: both are parsed by
/// [`BlockingQuery::parse`] so a bad value gets a message naming it.
#[derive(Debug, Default, Deserialize)]
pub struct BlockingQuery {
    /// Return once the service's index passes this.
    pub index: Option<String>,
    /// For at most this long (`30s`).
    pub wait: Option<String>,
}

impl BlockingQuery {
    /// The index (if any) and the wait, or 400 `invalid_query`.
    fn parse(&self) -> Result<(Option<i64>, Duration), ApiError> {
        let index = match &self.index {
            None => None,
            Some(raw) => match raw.trim().parse::<i64>() {
                Ok(i) if i >= 0 => Some(i),
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        format!(
                            "index {raw:?} is not an index: send the X-Signpost-Index of a previous answer (a whole number, 0 or more)"
                        ),
                    ));
                }
            },
        };
        let wait = match &self.wait {
            Some(raw) => crate::model::parse_duration("wait", raw)
                .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?
                .min(MAX_WAIT),
            None => DEFAULT_WAIT,
        };
        Ok((index, wait))
    }
}

/// `GET /v1/services/{svc}`, blocking when `index` is given.
pub async fn get_service(
    State(state): State<ApiState>,
    Path(svc): Path<String>,
    query: Result<Query<BlockingQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let svc = ServiceName::new(&svc)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let (index, wait) = q.parse()?;
    if let Some(index) = index {
        let catalog = &state.catalog;
        catalog
            .wait_service(&svc, wait, |_| catalog.service_index(&svc) > index)
            .await;
    }
    let snap = state.catalog.snapshot();
    let index = state.catalog.service_index(&svc);
    Ok(with_index(index, Json(service_view(&snap, &svc, index))))
}

fn service_view(snap: &Snapshot, svc: &ServiceName, index: i64) -> ServiceView {
    let entry = snap.service(svc);
    ServiceView {
        service: svc.clone(),
        index,
        config: entry.and_then(|e| e.config.clone()),
        instances: entry
            .map(|e| e.instances.values().map(InstanceView::from).collect())
            .unwrap_or_default(),
    }
}

/// `GET /v1/services`.
pub async fn list_services(State(state): State<ApiState>) -> Response {
    let snap = state.catalog.snapshot();
    let services = snap
        .services
        .iter()
        .map(|(name, entry)| {
            let tags: BTreeSet<&str> = entry
                .instances
                .values()
                .flat_map(|e| e.instance.tags.iter().map(Text::as_str))
                .collect();
            ServiceSummary {
                name: name.clone(),
                healthy: entry.healthy_count(),
                total: entry.instances.len(),
                tags: tags.into_iter().map(String::from).collect(),
            }
        })
        .collect();
    with_index(
        snap.revision,
        Json(ServiceList {
            index: snap.revision,
            services,
        }),
    )
}

/// `PUT /v1/services/{svc}/config`.
pub async fn put_config(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(svc): Path<String>,
    headers: HeaderMap,
    JsonBody(config): JsonBody<ServiceConfig>,
) -> Result<Response, ApiError> {
    let svc = ServiceName::new(&svc)?;
    principal(&state, &headers, peer).await?.may_write(&svc)?;
    let value = serde_json::to_vec(&config)
        .map_err(|e| ApiError::bad_request("invalid_config", e.to_string()))?;
    let revision = state
        .store
        .put(&state.keys.config(&svc), value, None)
        .await?;
    tracing::info!(service = %svc, allow = ?config.allow, mtls = ?config.mtls, "service config written");
    visible(&state, &svc, |snap| snap.revision >= revision).await;
    Ok(with_index(revision, Json(config)))
}

/// `GET /v1/services/{svc}/config`: the settings (defaults when none were
/// written).
pub async fn get_config(
    State(state): State<ApiState>,
    Path(svc): Path<String>,
) -> Result<Response, ApiError> {
    let svc = ServiceName::new(&svc)?;
    let snap = state.catalog.snapshot();
    let config = snap
        .service(&svc)
        .and_then(|e| e.config.clone())
        .unwrap_or_default();
    Ok(with_index(state.catalog.service_index(&svc), Json(config)))
}
