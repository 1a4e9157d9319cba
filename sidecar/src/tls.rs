//! Mesh TLS for the sidecar: the inbound acceptors and the outbound
//! connectors, built from `signpost-certs`.
//!
//! Both sides take the workload certificate from one [`CertHolder`], so a
//! renewal applies to the next handshake on either side without touching
//! open connections. Outbound connectors expect exactly the destination's
//! identity (`spiffe://<zone>/svc/<service>`); the inbound side accepts any
//! identity of the zone and leaves the decision to the allow-list.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};

use rustls::pki_types::ServerName;
use signpost_certs::{CertHolder, ClientAuth, Identity, TrustBundle};
use signpost_control_plane::model::ServiceName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::metrics::Metrics;
use crate::outbound::endpoint::{BoxFuture, BoxedIo, Connect, ConnectError, TcpConnect};

/// ALPN protocol id of an opaque TCP tunnel between sidecars: the inbound
/// side pipes such a connection's bytes to the app instead of parsing HTTP.
pub const ALPN_TCP: &[u8] = b"signpost-tcp";

/// What the inbound side offers: HTTP/2 (sidecars), HTTP/1.1, tunnels.
fn inbound_alpn() -> Vec<Vec<u8>> {
    let mut alpn = signpost_certs::default_alpn();
    alpn.push(ALPN_TCP.to_vec());
    alpn
}

/// The mesh TLS material of this sidecar: the certificate holder and the
/// trust bundle, which can be replaced while running (CA rotation).
#[derive(Clone)]
pub struct MeshTls {
    inner: Arc<Inner>,
}

struct Inner {
    bundle: ArcSwap<TrustBundle>,
    /// Bumped on every bundle change, so connectors rebuild their config.
    generation: AtomicU64,
    holder: Arc<CertHolder>,
    zone: String,
    metrics: Metrics,
    inbound: ArcSwapOption<Acceptors>,
    /// Asks the bundle refresh to fetch now: a handshake failed on a CA
    /// one side does not know, so the bundle may be out of date.
    refresh: tokio::sync::Notify,
}

impl Inner {
    /// Counts a failed handshake; one that names an unknown CA asks for
    /// the trust bundle at once.
    fn handshake_failed(&self, reason: &str) {
        self.metrics.handshake_failure(reason);
        if reason == signpost_certs::HandshakeFailure::UnknownCa.as_str() {
            self.refresh.notify_one();
        }
    }
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("zone", &self.inner.zone)
            .field("holder", &self.inner.holder)
            .finish()
    }
}

/// Why mesh TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `signpost-certs` refused to build a config.
    #[error(transparent)]
    Certs(#[from] signpost_certs::CertError),
    /// A service name does not make a valid identity.
    #[error(transparent)]
    Identity(#[from] signpost_certs::IdentityError),
}

impl Inner {
    fn acceptors(&self) -> Result<Acceptors, TlsError> {
        let bundle = self.bundle.load();
        let make = |auth| -> Result<TlsAcceptor, TlsError> {
            let config = signpost_certs::server_config(
                &bundle,
                &self.zone,
                self.holder.clone(),
                auth,
                inbound_alpn(),
            )?;
            Ok(TlsAcceptor::from(Arc::new(config)))
        };
        Ok(Acceptors {
            strict: make(ClientAuth::Required)?,
            permissive: make(ClientAuth::Optional)?,
        })
    }
}

impl MeshTls {
    /// Mesh TLS trusting `bundle`, presenting the certificate in `holder`.
    pub fn new(bundle: TrustBundle, holder: Arc<CertHolder>, zone: &str, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                bundle: ArcSwap::from_pointee(bundle),
                generation: AtomicU64::new(0),
                holder,
                zone: zone.to_string(),
                metrics,
                inbound: ArcSwapOption::empty(),
                refresh: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Resolves when a handshake failed on an unknown CA (see
    /// [`crate::certificate::run_bundle_refresh`]).
    pub async fn refresh_requested(&self) {
        self.inner.refresh.notified().await;
    }

    /// Whether the trust bundle holds the root that signed this sidecar's
    /// own certificate, as a peer's inbound checks it: when a CA rotation
    /// (or a `--dev` server's restart) dropped that root, peers refuse the
    /// certificate and a new one is needed.
    pub fn trusts_own_certificate(&self) -> bool {
        use rustls::server::danger::ClientCertVerifier as _;
        let bundle = self.inner.bundle.load();
        let key = self.inner.holder.current().certified_key();
        let Some((leaf, intermediates)) = key.cert.split_first() else {
            return false;
        };
        let Ok(verifier) = signpost_certs::ClientIdentityVerifier::new(
            &bundle,
            &self.inner.zone,
            ClientAuth::Required,
        ) else {
            return false;
        };
        verifier
            .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
            .is_ok()
    }

    /// The certificate holder.
    pub fn holder(&self) -> &Arc<CertHolder> {
        &self.inner.holder
    }

    /// The trust bundle in use.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.inner.bundle.load_full()
    }

    /// Replaces the trust bundle; new handshakes on both sides use it,
    /// established connections keep theirs. Returns whether it changed.
    pub fn set_bundle(&self, bundle: TrustBundle) -> Result<bool, TlsError> {
        if *self.inner.bundle.load_full() == bundle {
            return Ok(false);
        }
        let previous = self.inner.bundle.swap(Arc::new(bundle));
        match self.inner.acceptors() {
            Ok(acceptors) => {
                if self.inner.inbound.load().is_some() {
                    self.inner.inbound.store(Some(Arc::new(acceptors)));
                }
            }
            Err(err) => {
                // Keep serving with the bundle that worked.
                self.inner.bundle.store(previous);
                return Err(err);
            }
        }
        self.inner.generation.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The inbound acceptors (strict and permissive), following bundle
    /// changes.
    pub fn inbound(&self) -> Result<InboundTls, TlsError> {
        if self.inner.inbound.load().is_none() {
            self.inner
                .inbound
                .store(Some(Arc::new(self.inner.acceptors()?)));
        }
        Ok(InboundTls {
            mesh: self.inner.clone(),
        })
    }

    /// A connector to the sidecars of `service`, negotiating `alpn`
    /// ([`signpost_certs::ALPN_H2`] for HTTP, [`ALPN_TCP`] for tunnels).
    pub fn connector(&self, service: &ServiceName, alpn: &[u8]) -> Result<TlsConnect, TlsError> {
        let expected = Identity::new(service.as_str(), &self.inner.zone)?;
        let server_name = expected.server_name()?;
        let connect = TlsConnect {
            mesh: self.inner.clone(),
            expected,
            server_name,
            alpn: alpn.to_vec(),
            cached: Arc::new(ArcSwapOption::empty()),
        };
        // Build once now so a config error shows at start-up.
        connect.current()?;
        Ok(connect)
    }
}

struct Acceptors {
    strict: TlsAcceptor,
    permissive: TlsAcceptor,
}

/// The inbound acceptors, one per mTLS mode.
#[derive(Clone)]
pub struct InboundTls {
    mesh: Arc<Inner>,
}

impl InboundTls {
    fn acceptors(&self) -> Option<Arc<Acceptors>> {
        self.mesh.inbound.load_full()
    }

    /// Requires a client certificate.
    pub fn strict(&self) -> Option<TlsAcceptor> {
        self.acceptors().map(|a| a.strict.clone())
    }

    /// Verifies a client certificate when one is sent, accepts none.
    pub fn permissive(&self) -> Option<TlsAcceptor> {
        self.acceptors().map(|a| a.permissive.clone())
    }

    /// Counts a failed handshake (see [`MeshTls::refresh_requested`]).
    pub fn handshake_failure(&self, reason: &str) {
        self.mesh.handshake_failed(reason);
    }
}

/// Connects to one destination's sidecars over mesh TLS.
#[derive(Clone)]
pub struct TlsConnect {
    mesh: Arc<Inner>,
    expected: Identity,
    server_name: ServerName<'static>,
    alpn: Vec<u8>,
    cached: Arc<ArcSwapOption<(u64, TlsConnector)>>,
}

impl TlsConnect {
    /// The connector for the current bundle, rebuilt after a change.
    fn current(&self) -> Result<TlsConnector, TlsError> {
        let generation = self.mesh.generation.load(Ordering::Relaxed);
        if let Some(cached) = self.cached.load().as_ref()
            && cached.0 == generation
        {
            return Ok(cached.1.clone());
        }
        let config = signpost_certs::client_config(
            &self.mesh.bundle.load(),
            self.expected.clone(),
            self.mesh.holder.clone(),
            vec![self.alpn.clone()],
        )?;
        let connector = TlsConnector::from(Arc::new(config));
        self.cached
            .store(Some(Arc::new((generation, connector.clone()))));
        Ok(connector)
    }
}

impl Connect for TlsConnect {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<Result<BoxedIo, ConnectError>> {
        let this = self.clone();
        Box::pin(async move {
            let connector = this.current().map_err(|e| ConnectError::Tls {
                addr,
                reason: "config",
                source: std::io::Error::other(e.to_string()),
            })?;
            let tcp = TcpConnect.connect(addr).await?;
            match connector.connect(this.server_name.clone(), tcp).await {
                Ok(stream) => Ok(Box::new(stream) as BoxedIo),
                Err(source) => {
                    let reason = signpost_certs::classify_io(&source).as_str();
                    this.mesh.handshake_failed(reason);
                    Err(ConnectError::Tls {
                        addr,
                        reason,
                        source,
                    })
                }
            }
        })
    }
}

/// The mesh TLS of a sidecar once its first certificate came, and until
/// then why not. The listeners start before the certificate, so that a
/// caller gets an answer at once ("no certificate yet") rather than a
/// connection nobody serves.
#[derive(Clone, Default)]
pub struct MeshSlot(Arc<SlotInner>);

#[derive(Default)]
struct SlotInner {
    mesh: std::sync::OnceLock<MeshTls>,
    waiting: std::sync::Mutex<String>,
}

impl std::fmt::Debug for MeshSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshSlot")
            .field("filled", &self.0.mesh.get().is_some())
            .finish()
    }
}

impl MeshSlot {
    /// An empty slot, waiting for the control plane.
    pub fn new() -> Self {
        let slot = Self::default();
        slot.set_waiting("waiting for the control plane's first answer".into());
        slot
    }

    /// A slot holding `mesh` already.
    pub fn filled(mesh: MeshTls) -> Self {
        let slot = Self::default();
        slot.fill(mesh);
        slot
    }

    /// The mesh TLS, once there is a certificate.
    pub fn get(&self) -> Option<&MeshTls> {
        self.0.mesh.get()
    }

    /// Installs the mesh TLS made from the first certificate.
    pub fn fill(&self, mesh: MeshTls) {
        let _ = self.0.mesh.set(mesh);
    }

    /// Records why there is no certificate yet.
    pub fn set_waiting(&self, reason: String) {
        *self.0.waiting.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// Why there is no certificate yet; `None` once there is one.
    pub fn not_ready(&self) -> Option<String> {
        if self.0.mesh.get().is_some() {
            return None;
        }
        Some(
            self.0
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    /// A connector to the sidecars of `service` negotiating `alpn`, made
    /// on its first connection after the certificate came.
    pub fn connector(&self, service: &ServiceName, alpn: &'static [u8]) -> LateConnect {
        LateConnect {
            slot: self.clone(),
            service: service.clone(),
            alpn,
            built: Arc::default(),
        }
    }
}

/// A [`TlsConnect`] made once the slot holds the mesh TLS; before that,
/// every connection fails with "no certificate yet".
#[derive(Clone)]
pub struct LateConnect {
    slot: MeshSlot,
    service: ServiceName,
    alpn: &'static [u8],
    built: Arc<std::sync::OnceLock<Result<TlsConnect, String>>>,
}

impl Connect for LateConnect {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<Result<BoxedIo, ConnectError>> {
        let Some(mesh) = self.slot.get() else {
            let reason = self.slot.not_ready().unwrap_or_default();
            return Box::pin(async move {
                Err(ConnectError::Tls {
                    addr,
                    reason: "no_certificate",
                    source: std::io::Error::other(format!("no certificate yet: {reason}")),
                })
            });
        };
        let built = self.built.get_or_init(|| {
            mesh.connector(&self.service, self.alpn)
                .map_err(|e| e.to_string())
        });
        match built {
            Ok(connect) => connect.connect(addr),
            Err(reason) => Refuse::new(reason.clone()).connect(addr),
        }
    }
}

/// A connector that always fails, for a destination whose TLS config could
/// not be built: its requests get a 502 naming the reason.
#[derive(Debug, Clone)]
pub struct Refuse {
    reason: String,
}

impl Refuse {
    /// Fails every connection with `reason`.
    pub fn new(reason: String) -> Self {
        Self { reason }
    }
}

impl Connect for Refuse {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<Result<BoxedIo, ConnectError>> {
        let reason = self.reason.clone();
        Box::pin(async move {
            Err(ConnectError::Tls {
                addr,
                reason: "config",
                source: std::io::Error::other(reason),
            })
        })
    }
}
