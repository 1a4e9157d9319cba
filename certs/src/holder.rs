//! The current workload certificate, swappable while configs are live, and
//! the loop that renews it.
//!
//! rustls asks the holder for a certificate on every handshake, so a swap
//! applies to the next connection while established ones keep their
//! session: nothing is dropped on renewal.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::time::{Instant, sleep};
use tracing::{debug, error, info, warn};

use crate::identity::Identity;
use crate::workload::WorkloadCert;

/// Renew when this fraction of the lifetime has passed: late enough not to
/// load the CA needlessly, early enough that a CA outage of a third of the
/// lifetime goes unnoticed by peers.
const RENEW_AT: f64 = 2.0 / 3.0;
/// Spread renewals ±10 % so instances started together do not all hit the
/// CA at the same moment.
const JITTER: f64 = 0.1;
/// First retry delay after a failed renewal.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay: a CA that comes back is noticed within 30 s.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Holds the workload's current certificate for rustls, lock-free on the
/// handshake path.
pub struct CertHolder {
    current: ArcSwap<WorkloadCert>,
}

impl fmt::Debug for CertHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.current.load();
        f.debug_struct("CertHolder")
            .field("identity", current.identity())
            .field("expires", &current.expires())
            .finish()
    }
}

impl CertHolder {
    /// A holder starting with `cert`.
    pub fn new(cert: WorkloadCert) -> Self {
        Self {
            current: ArcSwap::from_pointee(cert),
        }
    }

    /// The current certificate.
    pub fn current(&self) -> Arc<WorkloadCert> {
        self.current.load_full()
    }

    /// Installs `cert` for the next handshakes and returns the previous one.
    pub fn replace(&self, cert: WorkloadCert) -> Arc<WorkloadCert> {
        self.current.swap(Arc::new(cert))
    }

    /// The current certificate's not-after time (for an expiry metric).
    pub fn expires(&self) -> SystemTime {
        self.current.load().expires()
    }

    /// The identity the current certificate proves.
    pub fn identity(&self) -> Identity {
        self.current.load().identity().clone()
    }

    /// Renews the certificate until `cancel` completes.
    ///
    /// Each certificate is renewed at two thirds of its lifetime, ±10 %
    /// jitter. `issue` obtains a new one (typically: generate a key, send
    /// the CSR to the control plane, pair the answer with the key). When it
    /// fails the loop retries with exponential backoff from 1 s to 30 s,
    /// keeping the current certificate meanwhile, and keeps retrying after
    /// it expires, as there is nothing better to serve.
    ///
    /// Sleeps with `tokio::time`, so tests can drive it with paused time.
    pub async fn run_renewal<F, Fut, E>(&self, mut issue: F, cancel: impl Future<Output = ()>)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<WorkloadCert, E>>,
        E: fmt::Display,
    {
        tokio::pin!(cancel);
        loop {
            let cert = self.current();
            let now = SystemTime::now();
            let jitter = rand::random_range(1.0 - JITTER..=1.0 + JITTER);
            let delay = renewal_delay(cert.renewal_start(), cert.expires(), now, jitter);
            // Expiry as a tokio instant, so the "expired" report below
            // follows the same (possibly paused) clock as the sleeps.
            let expires_at =
                Instant::now() + cert.expires().duration_since(now).unwrap_or_default();
            debug!(identity = %cert.identity(), renew_in = ?delay, "certificate renewal scheduled");
            tokio::select! {
                () = &mut cancel => return,
                () = sleep(delay) => {}
            }

            let mut backoff = BACKOFF_MIN;
            let mut reported_expiry = false;
            loop {
                let result = tokio::select! {
                    () = &mut cancel => return,
                    result = issue() => result,
                };
                match result {
                    Ok(new) => {
                        info!(identity = %new.identity(), expires = ?new.expires(), "certificate renewed");
                        self.replace(new);
                        break;
                    }
                    Err(err) if Instant::now() >= expires_at => {
                        // Once per certificate: from here every handshake
                        // fails, which is worth one loud line, not one per
                        // retry.
                        if !reported_expiry {
                            error!(error = %err, "certificate expired and renewal keeps failing; peers will refuse this workload");
                            reported_expiry = true;
                        } else {
                            debug!(error = %err, retry_in = ?backoff, "certificate renewal failed");
                        }
                    }
                    Err(err) => {
                        warn!(error = %err, retry_in = ?backoff, "certificate renewal failed; keeping the current certificate");
                    }
                }
                tokio::select! {
                    () = &mut cancel => return,
                    () = sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

impl ResolvesServerCert for CertHolder {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified_key())
    }
}

impl ResolvesClientCert for CertHolder {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// How long to wait before renewing a certificate whose lifetime runs from
/// `start` to `not_after`: until `RENEW_AT × jitter` of that lifetime,
/// measured from `now`; zero when that moment has passed.
fn renewal_delay(
    start: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    jitter: f64,
) -> Duration {
    let lifetime = not_after.duration_since(start).unwrap_or_default();
    // Capped at expiry, which also covers a not-after before the start.
    let renew_at = (start + lifetime.mul_f64(RENEW_AT * jitter)).min(not_after);
    renew_at.duration_since(now).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn delay_is_two_thirds_of_the_lifetime_with_jitter() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(3000);
        assert_eq!(
            renewal_delay(start, end, start, 1.0),
            Duration::from_secs(2000)
        );
        assert_eq!(
            renewal_delay(start, end, start, 0.9),
            Duration::from_secs(1800)
        );
        assert_eq!(
            renewal_delay(start, end, start, 1.1),
            Duration::from_secs(2200)
        );
        // Measured from now, not from the start.
        assert_eq!(
            renewal_delay(start, end, start + Duration::from_secs(500), 1.0),
            Duration::from_secs(1500)
        );
        // Past the renewal point (or expired): renew at once.
        assert_eq!(renewal_delay(start, end, end, 1.0), Duration::ZERO);
        assert_eq!(renewal_delay(end, start, start, 1.0), Duration::ZERO);
    }

    fn identity() -> Identity {
        Identity::new("user", "xingren.host").unwrap()
    }

    /// TTL of the test certificates: renewal falls between 0.9 × 2000 =
    /// 1800 s and 1.1 × 2000 = 2200 s after issue.
    const TTL: Duration = Duration::from_secs(3000);

    #[tokio::test(start_paused = true)]
    async fn renews_around_two_thirds_of_the_lifetime() {
        let ca = Arc::new(Ca::generate_in_memory().unwrap());
        let holder = Arc::new(CertHolder::new(ca.issue(&identity(), TTL).unwrap()));
        let first_serial = holder.current().serial().to_vec();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let holder = Arc::clone(&holder);
            let ca = Arc::clone(&ca);
            let calls = Arc::clone(&calls);
            tokio::spawn(async move {
                holder
                    .run_renewal(
                        move || {
                            calls.lock().unwrap().push(Instant::now());
                            let cert = ca.issue(&identity(), TTL);
                            async move { cert }
                        },
                        async move {
                            let _ = stopped.await;
                        },
                    )
                    .await;
            })
        };

        sleep(Duration::from_secs(1795)).await;
        assert!(calls.lock().unwrap().is_empty(), "renewed too early");
        assert_eq!(holder.current().serial(), first_serial);

        sleep(Duration::from_secs(2205 - 1795)).await;
        let at = calls.lock().unwrap().clone();
        assert_eq!(at.len(), 1, "expected exactly one renewal by 2205 s");
        let elapsed = at[0] - start;
        assert!(
            elapsed >= Duration::from_secs(1795) && elapsed <= Duration::from_secs(2201),
            "renewed after {elapsed:?}"
        );
        assert_ne!(holder.current().serial(), first_serial);

        stop.send(()).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn retries_with_exponential_backoff_and_keeps_the_current_certificate() {
        let ca = Arc::new(Ca::generate_in_memory().unwrap());
        // A ten-second certificate renews after 6 to 7.3 s; the issuer then
        // fails eight times before succeeding.
        let short = Duration::from_secs(10);
        let holder = Arc::new(CertHolder::new(ca.issue(&identity(), short).unwrap()));
        let first_serial = holder.current().serial().to_vec();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let attempts = Arc::new(AtomicUsize::new(0));
        let failures = 8;

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let holder = Arc::clone(&holder);
            let ca = Arc::clone(&ca);
            let calls = Arc::clone(&calls);
            let attempts = Arc::clone(&attempts);
            tokio::spawn(async move {
                holder
                    .run_renewal(
                        move || {
                            calls.lock().unwrap().push(Instant::now());
                            let n = attempts.fetch_add(1, Ordering::SeqCst);
                            let result = if n < failures {
                                Err("control plane unavailable")
                            } else {
                                // Long-lived so no further renewal interferes.
                                Ok(ca.issue(&identity(), TTL).unwrap())
                            };
                            async move { result }
                        },
                        async move {
                            let _ = stopped.await;
                        },
                    )
                    .await;
            })
        };

        // Through the failures the old certificate stays in place.
        sleep(Duration::from_secs(20)).await;
        assert!(attempts.load(Ordering::SeqCst) >= 2);
        assert_eq!(holder.current().serial(), first_serial);

        // 1+2+4+8+16+30+30+30 s of backoff after the first attempt.
        sleep(Duration::from_secs(200)).await;
        let at = calls.lock().unwrap().clone();
        assert_eq!(at.len(), failures + 1);
        let gaps: Vec<u64> = at.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
        assert_eq!(gaps, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_ne!(holder.current().serial(), first_serial);
        assert_eq!(holder.identity(), identity());

        stop.send(()).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn stops_when_cancelled() {
        let ca = Ca::generate_in_memory().unwrap();
        let holder = CertHolder::new(ca.issue(&identity(), TTL).unwrap());
        let issued = AtomicUsize::new(0);
        holder
            .run_renewal(
                || {
                    issued.fetch_add(1, Ordering::SeqCst);
                    async { Err::<WorkloadCert, _>("unused") }
                },
                sleep(Duration::from_secs(5)),
            )
            .await;
        assert_eq!(issued.load(Ordering::SeqCst), 0);
    }
}
