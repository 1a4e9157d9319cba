//! Keeping this instance in the catalog: registration with a TTL, heartbeats
//! at a third of it, re-registration when the lease expired anyway, the
//! app's health probe, and deregistration on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use signpost_control_plane::api::services::HealthReport;
use signpost_control_plane::client::Client;
use signpost_control_plane::model::{HealthStatus, InstanceId, Registration, ServiceName};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Shortest wait between two registration attempts after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest wait: a control plane that comes back is noticed within 10 s.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What `/ready` reports: ready once the certificate is held and the
/// instance registered.
#[derive(Debug, Default)]
pub struct Readiness {
    certificate: AtomicBool,
    registered: AtomicBool,
    stopping: AtomicBool,
}

impl Readiness {
    /// Records whether the certificate is held.
    pub fn set_certificate(&self, held: bool) {
        self.certificate.store(held, Ordering::Relaxed);
    }

    /// Records whether the instance is registered.
    pub fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Relaxed);
    }

    /// Records that shutdown began: not ready any more.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Why the sidecar is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.stopping.load(Ordering::Relaxed) {
            Some("shutting down")
        } else if !self.certificate.load(Ordering::Relaxed) {
            Some("no certificate yet")
        } else if !self.registered.load(Ordering::Relaxed) {
            Some("not registered yet")
        } else {
            None
        }
    }
}

/// Registers `registration` and keeps it alive until `cancel`.
///
/// Heartbeats go out every `ttl / 3`, so two may be lost before the lease
/// expires. A heartbeat answered 404 (the lease expired, e.g. after a
/// network partition, or the control plane lost its store) registers again.
pub async fn run_registration(
    client: Client,
    service: ServiceName,
    id: InstanceId,
    registration: Registration,
    ttl: Duration,
    ready: Arc<Readiness>,
    cancel: CancellationToken,
) {
    let interval = (ttl / 3).max(Duration::from_millis(300));
    let mut backoff = BACKOFF_MIN;
    let mut registered = false;
    loop {
        // Calls race the cancel token too: shutdown must not wait out a
        // control plane that is slow to answer.
        let wait = if registered {
            let heartbeat = tokio::select! {
                () = cancel.cancelled() => return,
                r = client.heartbeat(&service, &id) => r,
            };
            match heartbeat {
                Ok(_) => {
                    debug!("heartbeat");
                    interval
                }
                Err(err) if err.status() == Some(404) => {
                    warn!("registration expired; registering again");
                    registered = false;
                    ready.set_registered(false);
                    Duration::ZERO
                }
                Err(err) => {
                    warn!(%err, "heartbeat failed");
                    // Try again soon, still within the TTL.
                    (interval / 3).max(Duration::from_millis(100))
                }
            }
        } else {
            let registered_now = tokio::select! {
                () = cancel.cancelled() => return,
                r = client.register(&service, &id, &registration) => r,
            };
            match registered_now {
                Ok(instance) => {
                    info!(address = %instance.address, port = instance.port, ttl = ?ttl, "registered");
                    registered = true;
                    ready.set_registered(true);
                    backoff = BACKOFF_MIN;
                    interval
                }
                Err(err) => {
                    warn!(%err, retry_in = ?backoff, "registration failed");
                    let wait = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    wait
                }
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Probes `http://<app><path>` every `interval` and reports the result to
/// the control plane when it changes (and every tenth probe, in case the
/// control plane lost it).
pub async fn run_health_probe(
    client: Client,
    service: ServiceName,
    id: InstanceId,
    app: SocketAddr,
    path: String,
    interval: Duration,
    cancel: CancellationToken,
) {
    let http = match reqwest::Client::builder()
        .no_proxy()
        .timeout(interval.min(Duration::from_secs(2)))
        .build()
    {
        Ok(c) => c,
        Err(err) => {
            warn!(%err, "cannot build the health probe client");
            return;
        }
    };
    let path = if path.starts_with('/') {
        path
    } else {
        format!("/{path}")
    };
    let url = format!("http://{app}{path}");
    let mut last: Option<HealthStatus> = None;
    let mut probes: u32 = 0;
    loop {
        let probe = tokio::select! {
            () = cancel.cancelled() => return,
            r = http.get(&url).send() => r,
        };
        let (status, output) = match probe {
            Ok(rsp) if rsp.status().is_success() => (
                HealthStatus::Passing,
                format!("HTTP {}", rsp.status().as_u16()),
            ),
            Ok(rsp) => (
                HealthStatus::Critical,
                format!("HTTP {}", rsp.status().as_u16()),
            ),
            Err(err) => {
                let mut cur: &dyn std::error::Error = &err;
                while let Some(next) = cur.source() {
                    cur = next;
                }
                (HealthStatus::Critical, cur.to_string())
            }
        };
        if last != Some(status) || probes.is_multiple_of(10) {
            if last != Some(status) {
                info!(%status, %output, "app health");
            }
            let report = HealthReport {
                status,
                output: output.clone(),
            };
            let reported = tokio::select! {
                () = cancel.cancelled() => return,
                r = client.report_health(&service, &id, &report) => r,
            };
            match reported {
                Ok(()) => last = Some(status),
                // Not registered yet, or the control plane is away: the
                // next probe reports again.
                Err(err) => debug!(%err, "health report failed"),
            }
        }
        probes = probes.wrapping_add(1);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
