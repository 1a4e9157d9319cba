//! The order a sidecar starts and stops in.
//!
//! As linkerd2-proxy splits building its parts (`Config::build`) from
//! running them (`App::spawn`), a sidecar goes through these phases:
//!
//! 1. [`validate`]: the configuration is checked before anything binds.
//! 2. [`Parts::build`]: every part is made and nothing runs yet, so a part
//!    that cannot be made fails the start with no task left behind.
//! 3. [`Parts::serve`]: inbound, outbound, tunnels and admin serve at once.
//!    Until the first certificate, mesh calls are answered "no certificate
//!    yet" (calls leaving the mesh go out), so no caller waits on a silent
//!    port.
//! 4. [`Running::certify`]: a certificate and the trust bundle, waiting for
//!    the control plane; then their renewal and refresh.
//! 5. [`Running::register`]: registration, heartbeats and the app's health,
//!    only with a certificate, so that callers find an instance that can
//!    answer them.
//! 6. [`Running::shut_down`]: leave the catalog, let callers notice, drain,
//!    stop. Stopping has three stages: registration first, then the
//!    listeners (which drain), then the background loops and the admin
//!    port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use signpost_certs::{CertHolder, Identity, TrustBundle, WorkloadCert};
use signpost_control_plane::client::Client;
use signpost_control_plane::model::{Registration, ServiceConfig, ServiceName};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::admin::Admin;
use crate::certificate::{self, CertificateClient, CertificateError};
use crate::config::SidecarConfig;
use crate::discovery::Resolve;
use crate::error::SidecarError;
use crate::inbound::{self, Inbound, InboundConfig};
use crate::metrics::Metrics;
use crate::outbound::endpoint::{Connect, PeerProtocol};
use crate::outbound::proxy::{OutboundConfig, OutboundProxy};
use crate::outbound::{DestinationConfig, Destinations, MakeConnect};
use crate::register::{self, Readiness};
use crate::serve;
use crate::tls::{ALPN_TCP, MeshSlot, MeshTls};
use crate::tunnel;

/// Refuses a configuration the sidecar cannot run with.
pub(crate) fn validate(config: &SidecarConfig) -> Result<(), SidecarError> {
    // A zone that cannot form identities.
    Identity::new(config.service.as_str(), &config.zone)
        .map_err(|e| SidecarError::Config(format!("zone {:?}: {e}", config.zone)))?;
    for (what, own) in [("inbound", config.inbound), ("outbound", config.outbound)] {
        let same_ip = own.ip() == config.app.ip() || own.ip().is_unspecified();
        if own.port() == config.app.port() && own.port() != 0 && same_ip {
            return Err(SidecarError::Config(format!(
                "--app {} is the sidecar's own {what} listener: requests would loop; \
                 point --app at the application",
                config.app
            )));
        }
    }
    if config.ttl < Duration::from_secs(1) {
        return Err(SidecarError::Config(format!(
            "registration TTL {:?} is below the control plane's minimum of 1s",
            config.ttl
        )));
    }
    Ok(())
}

/// Every listener, bound.
pub(crate) struct Listeners {
    pub(crate) inbound: TcpListener,
    pub(crate) outbound: TcpListener,
    pub(crate) admin: TcpListener,
    pub(crate) upstreams: Vec<(ServiceName, TcpListener)>,
}

/// Where each listener ended up (port 0 is given a port by the system).
pub(crate) struct Bound {
    pub(crate) inbound: SocketAddr,
    pub(crate) outbound: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) upstreams: Vec<(ServiceName, SocketAddr)>,
}

impl Listeners {
    /// Binds every listener of `config`.
    pub(crate) async fn bind(config: &SidecarConfig) -> Result<Self, SidecarError> {
        let inbound = serve::bind("inbound", config.inbound).await?;
        let outbound = serve::bind("outbound", config.outbound).await?;
        let admin = serve::bind("admin", config.admin).await?;
        let mut upstreams = Vec::new();
        for (svc, addr) in &config.upstreams {
            upstreams.push((
                svc.clone(),
                serve::bind(&format!("upstream {svc}"), *addr).await?,
            ));
        }
        Ok(Self {
            inbound,
            outbound,
            admin,
            upstreams,
        })
    }

    /// The addresses bound.
    pub(crate) fn addresses(&self, config: &SidecarConfig) -> Result<Bound, SidecarError> {
        let local = |what: &str, l: &TcpListener, configured: SocketAddr| {
            l.local_addr().map_err(|source| SidecarError::Bind {
                what: what.to_string(),
                addr: configured,
                source,
            })
        };
        let mut upstreams = Vec::new();
        for ((svc, l), (_, configured)) in self.upstreams.iter().zip(&config.upstreams) {
            upstreams.push((svc.clone(), local("upstream", l, *configured)?));
        }
        Ok(Bound {
            inbound: local("inbound", &self.inbound, config.inbound)?,
            outbound: local("outbound", &self.outbound, config.outbound)?,
            admin: local("admin", &self.admin, config.admin)?,
            upstreams,
        })
    }
}

/// Runs a sidecar through every phase, from building its parts to the
/// end of its shutdown.
pub(crate) async fn drive(
    config: SidecarConfig,
    resolver: Arc<dyn Resolve>,
    listeners: Listeners,
    inbound_addr: SocketAddr,
    metrics: Metrics,
    ready: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), SidecarError> {
    let parts = Parts::build(config, resolver, metrics, ready)?;
    let mut running = parts.serve(listeners);
    info!(inbound = %inbound_addr, "sidecar serving; getting a certificate");
    if !running.certify(&shutdown).await? {
        running.stop().await;
        return Ok(());
    }
    running.register(inbound_addr);
    info!("sidecar registered and serving the mesh");
    shutdown.cancelled().await;
    running.shut_down().await;
    info!("stopped");
    Ok(())
}

/// Every part of a sidecar, made but not running.
struct Parts {
    config: SidecarConfig,
    metrics: Metrics,
    ready: Arc<Readiness>,
    client: Client,
    certs: CertificateClient,
    /// The mesh TLS, once there is a certificate.
    slot: MeshSlot,
    /// The service's config (allow-list, mTLS mode), followed on the
    /// control plane.
    policy: Arc<ArcSwap<ServiceConfig>>,
    inbound: Arc<Inbound>,
    destinations: Arc<Destinations>,
    outbound: Arc<OutboundProxy>,
}

impl Parts {
    fn build(
        config: SidecarConfig,
        resolver: Arc<dyn Resolve>,
        metrics: Metrics,
        ready: Arc<Readiness>,
    ) -> Result<Self, SidecarError> {
        let client = Client::new(&config.control_plane, config.token.clone())?;
        let certs = CertificateClient::new(
            &config.control_plane,
            config.token.clone(),
            config.service.clone(),
        )
        .map_err(|e| SidecarError::Certificate(e.to_string()))?;
        let slot = MeshSlot::new();
        let policy = Arc::new(ArcSwap::from_pointee(ServiceConfig::default()));
        let inbound = Inbound::new(
            InboundConfig {
                service: config.service.clone(),
                id: config.id.to_string(),
                app: config.app,
                request_timeout: config.request_timeout,
                app_protocol: config.app_protocol,
            },
            policy.clone(),
            Some(slot.clone()),
            metrics.clone(),
        );
        let make_connect = mesh_connectors(slot.clone());
        let destinations = Destinations::new(
            resolver,
            make_connect,
            DestinationConfig {
                connect_timeout: config.connect_timeout,
                max_pending: config.max_pending,
                idle_timeout: config.idle_timeout,
                ..DestinationConfig::default()
            },
            metrics.clone(),
        );
        let outbound = OutboundProxy::with_mesh(
            OutboundConfig {
                id: config.id.to_string(),
                zone: config.zone.clone(),
                request_timeout: config.request_timeout,
                connect_timeout: config.connect_timeout,
                body_idle_timeout: config.body_idle_timeout,
                egress: config.egress,
            },
            destinations.clone(),
            metrics.clone(),
            slot.clone(),
        )?;
        Ok(Self {
            config,
            metrics,
            ready,
            client,
            certs,
            slot,
            policy,
            inbound,
            destinations,
            outbound,
        })
    }

    /// Starts serving on `listeners`, with the loops that keep the
    /// service's config and the destinations current.
    fn serve(self, listeners: Listeners) -> Running {
        let stops = Stops::default();
        let admin = tokio::spawn(
            Admin::new(self.metrics.clone(), self.ready.clone())
                .serve(listeners.admin, stops.background.clone()),
        );
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        tasks.push(tokio::spawn(
            inbound::watch_service_config(
                self.client.clone(),
                self.config.service.clone(),
                self.policy.clone(),
                stops.background.clone(),
            )
            .instrument(info_span!("service_config")),
        ));
        let drain = self.config.drain;
        let mut servers = vec![tokio::spawn(self.inbound.clone().serve(
            listeners.inbound,
            stops.listeners.clone(),
            drain,
        ))];
        tasks.push(tokio::spawn(
            self.destinations
                .clone()
                .run_idle_reaper(stops.background.clone()),
        ));
        servers.push(tokio::spawn(self.outbound.clone().serve(
            listeners.outbound,
            stops.listeners.clone(),
            drain,
        )));
        for (svc, listener) in listeners.upstreams {
            servers.push(tokio::spawn(tunnel::serve(
                self.destinations.clone(),
                svc,
                listener,
                stops.listeners.clone(),
                drain,
            )));
        }
        Running {
            parts: self,
            stops,
            servers,
            tasks,
            admin,
            registration: None,
        }
    }
}

/// Makes the connector for a destination and protocol: mesh TLS from
/// `slot`, expecting that service's identity and negotiating the protocol.
fn mesh_connectors(slot: MeshSlot) -> MakeConnect {
    Arc::new(
        move |svc: &ServiceName, protocol: PeerProtocol| -> Arc<dyn Connect> {
            let alpn = match protocol {
                PeerProtocol::Http2 => signpost_certs::ALPN_H2,
                PeerProtocol::Http1 => signpost_certs::ALPN_HTTP1,
                PeerProtocol::Tcp => ALPN_TCP,
            };
            Arc::new(slot.connector(svc, alpn))
        },
    )
}

/// The three stages of stopping.
#[derive(Default)]
struct Stops {
    registration: CancellationToken,
    listeners: CancellationToken,
    background: CancellationToken,
}

/// A sidecar whose listeners serve.
struct Running {
    parts: Parts,
    stops: Stops,
    /// The listeners' tasks: they drain when stopped.
    servers: Vec<JoinHandle<()>>,
    /// The background loops.
    tasks: Vec<JoinHandle<()>>,
    admin: JoinHandle<()>,
    registration: Option<JoinHandle<()>>,
}

impl Running {
    /// Gets the first certificate and the trust bundle, then keeps both
    /// current in the background. `Ok(false)` when `shutdown` fired first.
    async fn certify(&mut self, shutdown: &CancellationToken) -> Result<bool, SidecarError> {
        let parts = &self.parts;
        let Some((cert, bundle)) = first_certificate(&parts.certs, &parts.slot, shutdown).await
        else {
            return Ok(false);
        };
        info!(identity = %cert.identity(), expires = %humantime::format_rfc3339_seconds(cert.expires()), "certificate obtained");
        parts.metrics.set_certificate_expiry(cert.expires());
        let holder = Arc::new(CertHolder::new(cert));
        let mesh = MeshTls::new(
            bundle,
            holder.clone(),
            &parts.config.zone,
            parts.metrics.clone(),
        );
        mesh.inbound()
            .map_err(|e| SidecarError::Certificate(e.to_string()))?;
        parts.slot.fill(mesh.clone());
        parts.ready.set_certificate(true);
        let (certs, metrics, cancel) = (
            parts.certs.clone(),
            parts.metrics.clone(),
            self.stops.background.clone(),
        );
        self.tasks.push(tokio::spawn(
            async move {
                holder
                    .run_renewal(
                        || {
                            let (certs, metrics) = (certs.clone(), metrics.clone());
                            async move {
                                let cert = certs.issue().await?;
                                metrics.set_certificate_expiry(cert.expires());
                                Ok::<_, CertificateError>(cert)
                            }
                        },
                        cancel.cancelled_owned(),
                    )
                    .await;
            }
            .instrument(info_span!("renewal")),
        ));
        self.tasks.push(tokio::spawn(
            certificate::run_bundle_refresh(
                parts.certs.clone(),
                mesh,
                parts.config.bundle_refresh,
                parts.ready.clone(),
                parts.metrics.clone(),
                self.stops.background.clone(),
            )
            .instrument(info_span!("trust_bundle")),
        ));
        Ok(true)
    }

    /// Registers the instance (its inbound at `inbound_addr`), heartbeats,
    /// and reports the app's health when a probe path is set.
    fn register(&mut self, inbound_addr: SocketAddr) {
        let config = &self.parts.config;
        let client = &self.parts.client;
        let registration = Registration {
            address: config.address.to_string(),
            port: i64::from(inbound_addr.port()),
            ports: BTreeMap::from([("http".to_string(), i64::from(inbound_addr.port()))]),
            ttl: Some(humantime::format_duration(config.ttl).to_string()),
            ..Registration::default()
        };
        self.registration = Some(tokio::spawn(
            register::run_registration(
                client.clone(),
                config.service.clone(),
                config.id.clone(),
                registration,
                config.ttl,
                self.parts.ready.clone(),
                self.stops.registration.clone(),
            )
            .instrument(info_span!("registration")),
        ));
        if let Some(path) = config.app_health.clone() {
            self.tasks.push(tokio::spawn(
                register::run_health_probe(
                    client.clone(),
                    config.service.clone(),
                    config.id.clone(),
                    config.app,
                    path,
                    config.health_interval,
                    self.stops.registration.clone(),
                )
                .instrument(info_span!("health_probe")),
            ));
        }
    }

    /// Leaves the catalog, serves on while callers' DNS caches expire,
    /// then drains and stops.
    async fn shut_down(mut self) {
        let config = &self.parts.config;
        info!("shutting down: deregistering");
        self.parts.ready.set_stopping();
        self.stops.registration.cancel();
        if let Some(registration) = self.registration.take() {
            let _ = registration.await;
        }
        match tokio::time::timeout(
            Duration::from_secs(5),
            self.parts.client.deregister(&config.service, &config.id),
        )
        .await
        {
            Ok(Ok(())) => info!("deregistered"),
            Ok(Err(err)) => warn!(%err, "deregistration failed; the TTL will expire the instance"),
            Err(_) => warn!("deregistration timed out; the TTL will expire the instance"),
        }
        info!(linger = ?config.shutdown_linger, "serving while callers' DNS caches expire");
        tokio::time::sleep(config.shutdown_linger).await;
        info!(drain = ?config.drain, "no longer accepting; draining");
        self.stop().await;
    }

    /// The last two stages of stopping: the listeners (which drain), then
    /// the background loops and the admin port.
    async fn stop(self) {
        self.stops.listeners.cancel();
        for server in self.servers {
            let _ = server.await;
        }
        self.stops.background.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = self.admin.await;
    }
}

/// Asks the control plane for a certificate and the trust bundle until it
/// gives both, recording in `slot` why not meanwhile; `None` when
/// `shutdown` fires first.
async fn first_certificate(
    certs: &CertificateClient,
    slot: &MeshSlot,
    shutdown: &CancellationToken,
) -> Option<(WorkloadCert, TrustBundle)> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let attempt =
            async { Ok::<_, CertificateError>((certs.issue().await?, certs.roots().await?)) };
        let result = tokio::select! {
            () = shutdown.cancelled() => return None,
            r = attempt => r,
        };
        match result {
            Ok(got) => return Some(got),
            Err(err) => {
                warn!(%err, retry_in = ?backoff, "no certificate yet");
                slot.set_waiting(err.to_string());
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
