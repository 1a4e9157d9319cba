//! The per-instance sidecar proxy.
//!
//! This crate is responsible for one instance's place in the mesh: it gets a
//! certificate ([`certificate`]), registers and heartbeats the instance and
//! reports the app's health ([`register`]), accepts mutual-TLS traffic
//! inbound and applies the service's allow-list ([`inbound`]), and proxies
//! the app's outbound calls to peers found through Signpost DNS
//! ([`discovery`]), balancing, retrying and ejecting failing peers
//! ([`outbound`]); it carries opaque TCP over mesh TLS ([`tunnel`]) and
//! serves metrics and readiness ([`admin`]). It does not store anything:
//! the control plane owns the catalog, DNS serves it.
//!
//! The binary calls [`run`]; tests and embedders that need the bound
//! addresses (port 0) or a resolver of their own use [`Sidecar::start`].
//!
//! ```no_run
//! use signpost_control_plane::model::{InstanceId, ServiceName};
//! use signpost_sidecar::{SidecarConfig, run};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = SidecarConfig::new(
//!     ServiceName::new("user")?,
//!     InstanceId::new("u1")?,
//!     "10.0.0.5".parse()?,
//!     "127.0.0.1:8080".parse()?,
//!     "http://127.0.0.1:8500",
//!     "127.0.0.1:5353".parse()?,
//! );
//! config.app_health = Some("/healthz".into());
//! let shutdown = CancellationToken::new();
//! // Cancel `shutdown` on SIGTERM: the sidecar deregisters, lingers one DNS
//! // TTL, drains, and `run` returns Ok.
//! run(config, shutdown).await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod body;
pub mod certificate;
pub mod config;
pub mod deadline;
pub mod discovery;
pub mod error;
pub mod headers;
pub mod http2;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod register;
pub mod serve;
pub mod tls;
pub mod tunnel;
pub mod wake;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use signpost_certs::{CertHolder, Identity};
use signpost_control_plane::client::Client;
use signpost_control_plane::model::{Registration, ServiceConfig, ServiceName};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

pub use crate::config::SidecarConfig;
pub use crate::discovery::{DnsResolver, Resolve, StaticResolver};
pub use crate::error::{ProxyError, SidecarError};
pub use crate::metrics::Metrics;

use crate::admin::Admin;
use crate::certificate::CertificateClient;
use crate::inbound::{Inbound, InboundConfig};
use crate::outbound::endpoint::{Connect, PeerProtocol};
use crate::outbound::proxy::{OutboundConfig, OutboundProxy};
use crate::outbound::{DestinationConfig, Destinations, MakeConnect};
use crate::register::Readiness;
use crate::tls::{ALPN_TCP, MeshSlot, MeshTls};

/// Runs a sidecar until `shutdown` is cancelled, then deregisters, keeps
/// serving for [`SidecarConfig::shutdown_linger`], drains in-flight requests
/// for up to [`SidecarConfig::drain`] and returns `Ok`.
///
/// Errors only when it cannot start (a listener cannot be bound, the
/// configuration is invalid). An unreachable control plane is waited for,
/// with `/ready` answering 503 meanwhile.
pub async fn run(config: SidecarConfig, shutdown: CancellationToken) -> Result<(), SidecarError> {
    Sidecar::start(config, shutdown).await?.wait().await
}

/// A started sidecar: its bound addresses, and its task.
#[derive(Debug)]
pub struct Sidecar {
    /// Where the inbound listener is bound.
    pub inbound: SocketAddr,
    /// Where the outbound proxy is bound.
    pub outbound: SocketAddr,
    /// Where the admin server is bound.
    pub admin: SocketAddr,
    /// Where each TCP tunnel is bound.
    pub upstreams: Vec<(ServiceName, SocketAddr)>,
    /// The metrics it keeps.
    pub metrics: Metrics,
    ready: Arc<Readiness>,
    task: JoinHandle<Result<(), SidecarError>>,
}

struct Listeners {
    inbound: TcpListener,
    outbound: TcpListener,
    admin: TcpListener,
    upstreams: Vec<(ServiceName, TcpListener)>,
}

impl Sidecar {
    /// Binds every listener and starts the sidecar, resolving peers through
    /// the DNS server in the configuration.
    pub async fn start(
        config: SidecarConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, SidecarError> {
        let resolver = Arc::new(DnsResolver::new(config.dns, &config.zone)?);
        Self::start_with_resolver(config, resolver, shutdown).await
    }

    /// Like [`Sidecar::start`], resolving peers with `resolver`.
    pub async fn start_with_resolver(
        config: SidecarConfig,
        resolver: Arc<dyn Resolve>,
        shutdown: CancellationToken,
    ) -> Result<Self, SidecarError> {
        // Fail early on a zone that cannot form identities.
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
        let listeners = Listeners {
            inbound: serve::bind("inbound", config.inbound).await?,
            outbound: serve::bind("outbound", config.outbound).await?,
            admin: serve::bind("admin", config.admin).await?,
            upstreams: {
                let mut v = Vec::new();
                for (svc, addr) in &config.upstreams {
                    v.push((
                        svc.clone(),
                        serve::bind(&format!("upstream {svc}"), *addr).await?,
                    ));
                }
                v
            },
        };
        let local = |what: &str, l: &TcpListener, configured: SocketAddr| {
            l.local_addr().map_err(|source| SidecarError::Bind {
                what: what.to_string(),
                addr: configured,
                source,
            })
        };
        let inbound = local("inbound", &listeners.inbound, config.inbound)?;
        let outbound = local("outbound", &listeners.outbound, config.outbound)?;
        let admin = local("admin", &listeners.admin, config.admin)?;
        let mut upstreams = Vec::new();
        for ((svc, l), (_, configured)) in listeners.upstreams.iter().zip(&config.upstreams) {
            upstreams.push((svc.clone(), local("upstream", l, *configured)?));
        }
        let metrics = Metrics::new();
        let ready = Arc::new(Readiness::default());
        let span = info_span!("sidecar", service = %config.service, id = %config.id);
        let task = tokio::spawn(
            drive(
                config,
                resolver,
                listeners,
                inbound,
                metrics.clone(),
                ready.clone(),
                shutdown,
            )
            .instrument(span),
        );
        Ok(Self {
            inbound,
            outbound,
            admin,
            upstreams,
            metrics,
            ready,
            task,
        })
    }

    /// Whether `/ready` would answer 200.
    pub fn is_ready(&self) -> bool {
        self.ready.not_ready().is_none()
    }

    /// Waits for the sidecar to stop (after the shutdown token fired).
    pub async fn wait(self) -> Result<(), SidecarError> {
        match self.task.await {
            Ok(result) => result,
            Err(err) => Err(SidecarError::Crashed(err.to_string())),
        }
    }
}

async fn drive(
    config: SidecarConfig,
    resolver: Arc<dyn Resolve>,
    listeners: Listeners,
    inbound_addr: SocketAddr,
    metrics: Metrics,
    ready: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), SidecarError> {
    // Three stages of stopping: registration first, then the listeners,
    // then the background loops and the admin port.
    let stop_registration = CancellationToken::new();
    let stop_listeners = CancellationToken::new();
    let stop_background = CancellationToken::new();
    let client = Client::new(&config.control_plane, config.token.clone())?;

    let admin = tokio::spawn(
        Admin::new(metrics.clone(), ready.clone()).serve(listeners.admin, stop_background.clone()),
    );
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();

    // 1. Inbound, outbound and tunnels serve at once: until the first
    //    certificate, mesh calls are answered "no certificate yet" (calls
    //    leaving the mesh go out), so no caller waits on a silent port.
    let slot = MeshSlot::new();
    let policy = Arc::new(ArcSwap::from_pointee(ServiceConfig::default()));
    tasks.push(tokio::spawn(
        inbound::watch_service_config(
            client.clone(),
            config.service.clone(),
            policy.clone(),
            stop_background.clone(),
        )
        .instrument(info_span!("service_config")),
    ));
    let inbound = Inbound::new(
        InboundConfig {
            service: config.service.clone(),
            id: config.id.to_string(),
            app: config.app,
            request_timeout: config.request_timeout,
            app_protocol: config.app_protocol,
        },
        policy,
        Some(slot.clone()),
        metrics.clone(),
    );
    let mut servers = vec![tokio::spawn(inbound.serve(
        listeners.inbound,
        stop_listeners.clone(),
        config.drain,
    ))];
    let make_connect: MakeConnect = {
        let slot = slot.clone();
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
    };
    let destinations = Destinations::new(
        resolver.clone(),
        make_connect.clone(),
        DestinationConfig {
            connect_timeout: config.connect_timeout,
            max_pending: config.max_pending,
            idle_timeout: config.idle_timeout,
            ..DestinationConfig::default()
        },
        metrics.clone(),
    );
    tasks.push(tokio::spawn(
        destinations
            .clone()
            .run_idle_reaper(stop_background.clone()),
    ));
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
    servers.push(tokio::spawn(outbound.serve(
        listeners.outbound,
        stop_listeners.clone(),
        config.drain,
    )));
    for (svc, listener) in listeners.upstreams {
        servers.push(tokio::spawn(tunnel::serve(
            destinations.clone(),
            svc,
            listener,
            stop_listeners.clone(),
            config.drain,
        )));
    }
    info!(inbound = %inbound_addr, "sidecar serving; getting a certificate");

    // 2. A certificate and the trust bundle, waiting for the control plane.
    let certs = CertificateClient::new(
        &config.control_plane,
        config.token.clone(),
        config.service.clone(),
    )
    .map_err(|e| SidecarError::Certificate(e.to_string()))?;
    let stopping = Stopping {
        listeners: stop_listeners,
        background: stop_background.clone(),
    };
    let Some((cert, bundle)) = first_certificate(&certs, &slot, &shutdown).await else {
        stopping.stop(servers, tasks, admin).await;
        return Ok(());
    };
    info!(identity = %cert.identity(), expires = %humantime::format_rfc3339_seconds(cert.expires()), "certificate obtained");
    metrics.set_certificate_expiry(cert.expires());
    let holder = Arc::new(CertHolder::new(cert));
    let mesh = MeshTls::new(bundle, holder.clone(), &config.zone, metrics.clone());
    mesh.inbound()
        .map_err(|e| SidecarError::Certificate(e.to_string()))?;
    slot.fill(mesh.clone());
    ready.set_certificate(true);
    {
        let (holder, certs, metrics, cancel) = (
            holder.clone(),
            certs.clone(),
            metrics.clone(),
            stop_background.clone(),
        );
        tasks.push(tokio::spawn(
            async move {
                holder
                    .run_renewal(
                        || {
                            let (certs, metrics) = (certs.clone(), metrics.clone());
                            async move {
                                let cert = certs.issue().await?;
                                metrics.set_certificate_expiry(cert.expires());
                                Ok::<_, certificate::CertificateError>(cert)
                            }
                        },
                        cancel.cancelled_owned(),
                    )
                    .await;
            }
            .instrument(info_span!("renewal")),
        ));
    }
    tasks.push(tokio::spawn(
        certificate::run_bundle_refresh(
            certs.clone(),
            mesh.clone(),
            config.bundle_refresh,
            ready.clone(),
            metrics.clone(),
            stop_background.clone(),
        )
        .instrument(info_span!("trust_bundle")),
    ));

    // 3. Registration, heartbeats, health: only with a certificate, so
    //    that callers find an instance that can answer them.
    let registration = Registration {
        address: config.address.to_string(),
        port: i64::from(inbound_addr.port()),
        ports: BTreeMap::from([("http".to_string(), i64::from(inbound_addr.port()))]),
        ttl: Some(humantime::format_duration(config.ttl).to_string()),
        ..Registration::default()
    };
    let registration_task = tokio::spawn(
        register::run_registration(
            client.clone(),
            config.service.clone(),
            config.id.clone(),
            registration,
            config.ttl,
            ready.clone(),
            stop_registration.clone(),
        )
        .instrument(info_span!("registration")),
    );
    if let Some(path) = config.app_health.clone() {
        tasks.push(tokio::spawn(
            register::run_health_probe(
                client.clone(),
                config.service.clone(),
                config.id.clone(),
                config.app,
                path,
                config.health_interval,
                stop_registration.clone(),
            )
            .instrument(info_span!("health_probe")),
        ));
    }
    info!("sidecar registered and serving the mesh");

    // 4. Shutdown: leave the catalog, let callers notice, drain, stop.
    shutdown.cancelled().await;
    info!("shutting down: deregistering");
    ready.set_stopping();
    stop_registration.cancel();
    let _ = registration_task.await;
    match tokio::time::timeout(
        Duration::from_secs(5),
        client.deregister(&config.service, &config.id),
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
    stopping.stop(servers, tasks, admin).await;
    info!("stopped");
    Ok(())
}

/// The last two stages of stopping: the listeners (which drain), then the
/// background loops and the admin port.
struct Stopping {
    listeners: CancellationToken,
    background: CancellationToken,
}

impl Stopping {
    async fn stop(
        self,
        servers: Vec<JoinHandle<()>>,
        tasks: Vec<JoinHandle<()>>,
        admin: JoinHandle<()>,
    ) {
        self.listeners.cancel();
        for server in servers {
            let _ = server.await;
        }
        self.background.cancel();
        for task in tasks {
            let _ = task.await;
        }
        let _ = admin.await;
    }
}

/// Asks the control plane for a certificate and the trust bundle until it
/// gives both, recording in `slot` why not meanwhile; `None` when
/// `shutdown` fires first.
async fn first_certificate(
    certs: &CertificateClient,
    slot: &MeshSlot,
    shutdown: &CancellationToken,
) -> Option<(signpost_certs::WorkloadCert, signpost_certs::TrustBundle)> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let attempt = async {
            Ok::<_, certificate::CertificateError>((certs.issue().await?, certs.roots().await?))
        };
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
