//! Getting the workload certificate and the trust bundle from the control
//! plane (`POST /v1/certs`, `GET /v1/ca/roots`).
//!
//! The key never leaves the sidecar: a fresh key and CSR per issuance, the
//! control plane signs it for the identity its token stands for.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use signpost_certs::{TrustBundle, WorkloadCert, WorkloadKey};
use signpost_control_plane::model::ServiceName;

/// Why a certificate or the trust bundle could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The control plane could not be reached.
    #[error("cannot reach the control plane at {url}: {reason}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// The innermost cause.
        reason: String,
    },
    /// The control plane refused.
    #[error("the control plane refused {what} ({status}): {message}")]
    Refused {
        /// What was asked.
        what: &'static str,
        /// HTTP status.
        status: u16,
        /// The error message from the body.
        message: String,
    },
    /// The answer or the key material was unusable.
    #[error("unusable certificate material: {0}")]
    Material(String),
}

#[derive(Serialize)]
struct CertRequest<'a> {
    csr: &'a str,
    service: &'a str,
}

#[derive(Deserialize)]
struct CertReply {
    certificate: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorInner,
}

#[derive(Deserialize)]
struct ErrorInner {
    message: String,
}

/// A client of the control plane's CA routes.
#[derive(Debug, Clone)]
pub struct CertificateClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    service: ServiceName,
}

fn innermost(err: &reqwest::Error) -> String {
    let mut cur: &dyn std::error::Error = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

impl CertificateClient {
    /// A client for `service`'s certificate, authenticated by `token`.
    pub fn new(
        base: &str,
        token: Option<String>,
        service: ServiceName,
    ) -> Result<Self, CertificateError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .map_err(|e| CertificateError::Material(e.to_string()))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.trim().is_empty()),
            service,
        })
    }

    async fn send(
        &self,
        what: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<bytes::Bytes, CertificateError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let rsp = req
            .send()
            .await
            .map_err(|e| CertificateError::Unreachable {
                url: self.base.clone(),
                reason: innermost(&e),
            })?;
        let status = rsp.status();
        let body = rsp
            .bytes()
            .await
            .map_err(|e| CertificateError::Unreachable {
                url: self.base.clone(),
                reason: innermost(&e),
            })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
            return Err(CertificateError::Refused {
                what,
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    }

    /// Generates a key, has its CSR signed, and pairs the two.
    pub async fn issue(&self) -> Result<WorkloadCert, CertificateError> {
        let key = WorkloadKey::generate().map_err(|e| CertificateError::Material(e.to_string()))?;
        let csr = key
            .csr_pem()
            .map_err(|e| CertificateError::Material(e.to_string()))?;
        let req = self
            .http
            .post(format!("{}/v1/certs", self.base))
            .json(&CertRequest {
                csr: &csr,
                service: self.service.as_str(),
            });
        let body = self.send("a certificate", req).await?;
        let reply: CertReply = serde_json::from_slice(&body)
            .map_err(|e| CertificateError::Material(format!("POST /v1/certs answer: {e}")))?;
        WorkloadCert::from_chain_pem(&key, &reply.certificate)
            .map_err(|e| CertificateError::Material(e.to_string()))
    }

    /// The mesh's trust bundle.
    pub async fn roots(&self) -> Result<TrustBundle, CertificateError> {
        let req = self.http.get(format!("{}/v1/ca/roots", self.base));
        let body = self.send("the trust bundle", req).await?;
        let pem = String::from_utf8_lossy(&body);
        TrustBundle::from_pem(&pem).map_err(|e| CertificateError::Material(e.to_string()))
    }
}

/// How often the trust bundle is fetched again: a new root published for a
/// CA rotation is trusted within a minute, long before certificates signed
/// by it appear (they come with renewals, at two thirds of a lifetime).
pub const BUNDLE_REFRESH: Duration = Duration::from_secs(60);

/// Fetches the trust bundle every `interval`, and at once (at most every
/// [`MIN_REFRESH`]) when a handshake failed on an unknown CA, installing it
/// in `mesh` when it changed, until `cancel`. Failures keep the current
/// bundle.
///
/// When the bundle no longer holds the root that signed this sidecar's
/// certificate, peers refuse it: a new certificate is asked for at once,
/// and `ready` says not ready until the sidecar holds one the bundle
/// trusts.
pub async fn run_bundle_refresh(
    client: CertificateClient,
    mesh: crate::tls::MeshTls,
    interval: Duration,
    ready: std::sync::Arc<crate::register::Readiness>,
    metrics: crate::Metrics,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
            () = mesh.refresh_requested() => {
                tracing::debug!("a handshake met an unknown CA; fetching the trust bundle");
            }
        }
        let fetched = tokio::select! {
            () = cancel.cancelled() => return,
            r = client.roots() => r,
        };
        match fetched.map(|bundle| mesh.set_bundle(bundle)) {
            Ok(Ok(true)) => tracing::info!("trust bundle changed; new handshakes use it"),
            Ok(Ok(false)) => tracing::debug!("trust bundle unchanged"),
            Ok(Err(err)) => {
                tracing::warn!(%err, "new trust bundle unusable; keeping the current one")
            }
            Err(err) => tracing::debug!(%err, "trust bundle refresh failed"),
        }
        if !mesh.trusts_own_certificate() {
            renew_untrusted(&client, &mesh, &ready, &metrics, &cancel).await;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(MIN_REFRESH) => {}
        }
    }
}

/// The shortest time between two fetches of the trust bundle.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Gets certificates until one is trusted by the bundle, not ready
/// meanwhile.
async fn renew_untrusted(
    client: &CertificateClient,
    mesh: &crate::tls::MeshTls,
    ready: &crate::register::Readiness,
    metrics: &crate::Metrics,
    cancel: &tokio_util::sync::CancellationToken,
) {
    tracing::warn!("the trust bundle no longer holds this sidecar's CA; getting a new certificate");
    ready.set_certificate(false);
    let mut backoff = Duration::from_millis(500);
    loop {
        let issued = tokio::select! {
            () = cancel.cancelled() => return,
            r = client.issue() => r,
        };
        match issued {
            Ok(cert) => {
                metrics.set_certificate_expiry(cert.expires());
                mesh.holder().replace(cert);
                if mesh.trusts_own_certificate() {
                    tracing::info!("new certificate, trusted by the bundle");
                    ready.set_certificate(true);
                    return;
                }
                // Signed by a root the bundle does not hold yet: the
                // bundle is older than the CA; fetch it again.
                if let Ok(bundle) = client.roots().await {
                    let _ = mesh.set_bundle(bundle);
                    if mesh.trusts_own_certificate() {
                        ready.set_certificate(true);
                        return;
                    }
                }
            }
            Err(err) => tracing::warn!(%err, retry_in = ?backoff, "no new certificate yet"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
