//! The sidecar's settings, with the defaults the contract promises.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use signpost_control_plane::model::{InstanceId, ServiceName};

pub use crate::outbound::proxy::Egress;
pub use crate::transport::app::AppProtocol;

/// Default inbound listener: all interfaces, since peers call in from other
/// hosts.
pub const DEFAULT_INBOUND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15006);
/// Default outbound listener: loopback only, it is for the local app.
pub const DEFAULT_OUTBOUND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15001);
/// Default admin listener: loopback only, metrics are not for the world.
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);

/// Everything a sidecar needs to run; build with [`SidecarConfig::new`] and
/// adjust fields.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// The service this instance belongs to.
    pub service: ServiceName,
    /// This instance's id (also the sidecar's id in the loop guard).
    pub id: InstanceId,
    /// The address peers reach this instance at (registered in the catalog).
    pub address: IpAddr,
    /// The local app, e.g. 127.0.0.1:8080.
    pub app: SocketAddr,
    /// Path of the app's health endpoint (`/healthz`), probed every
    /// [`SidecarConfig::health_interval`]; `None` reports nothing.
    pub app_health: Option<String>,
    /// Inbound (mesh) listener; its port is the registered port.
    pub inbound: SocketAddr,
    /// Outbound (app-facing HTTP proxy) listener.
    pub outbound: SocketAddr,
    /// Admin listener (`/metrics`, `/ready`, `/live`).
    pub admin: SocketAddr,
    /// TCP tunnels: local address → service.
    pub upstreams: Vec<(ServiceName, SocketAddr)>,
    /// The control plane's base URL (`http://127.0.0.1:8500`).
    pub control_plane: String,
    /// The DNS server to resolve peers with (Signpost DNS).
    pub dns: SocketAddr,
    /// This service's token (registration and certificate).
    pub token: Option<String>,
    /// The mesh zone.
    pub zone: String,
    /// Registration TTL: heartbeats go out every third of it. 10 s: a dead
    /// instance leaves DNS within seconds while a lost heartbeat or two is
    /// harmless.
    pub ttl: Duration,
    /// Limit for a whole outbound request (retries included) until response
    /// headers, and for the app's answer inbound.
    pub request_timeout: Duration,
    /// Limit for connecting to a peer.
    pub connect_timeout: Duration,
    /// On shutdown, how long in-flight requests may take to finish.
    pub drain: Duration,
    /// On shutdown, how long to keep serving after deregistering: one DNS
    /// TTL, so callers' caches forget this instance before it stops.
    pub shutdown_linger: Duration,
    /// Pending requests per destination past which new ones get 503 at once.
    pub max_pending: usize,
    /// Interval of the app health probe.
    pub health_interval: Duration,
    /// Idle destinations are dropped (and no longer resolved) after this.
    pub idle_timeout: Duration,
    /// Which protocol the local app is spoken to in.
    pub app_protocol: AppProtocol,
    /// Whether the app's calls may leave the mesh.
    pub egress: Egress,
    /// A request body from the app that sends nothing this long is cut
    /// (gRPC streams excepted).
    pub body_idle_timeout: Duration,
    /// How often the trust bundle is fetched again (and at once after a
    /// handshake met an unknown CA).
    pub bundle_refresh: Duration,
}

impl SidecarConfig {
    /// A configuration with the contract's defaults.
    pub fn new(
        service: ServiceName,
        id: InstanceId,
        address: IpAddr,
        app: SocketAddr,
        control_plane: impl Into<String>,
        dns: SocketAddr,
    ) -> Self {
        Self {
            service,
            id,
            address,
            app,
            app_health: None,
            inbound: DEFAULT_INBOUND,
            outbound: DEFAULT_OUTBOUND,
            admin: DEFAULT_ADMIN,
            upstreams: Vec::new(),
            control_plane: control_plane.into(),
            dns,
            token: None,
            zone: "xingren.host".into(),
            ttl: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
            drain: Duration::from_secs(10),
            shutdown_linger: Duration::from_secs(5),
            // Far above normal concurrency, low enough that a stuck peer
            // cannot make the sidecar hold unbounded memory.
            max_pending: 1000,
            health_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            app_protocol: AppProtocol::Auto,
            egress: Egress::Allow,
            // Twice the request timeout: an upload that pauses this long
            // has stalled.
            body_idle_timeout: Duration::from_secs(60),
            bundle_refresh: crate::certificate::BUNDLE_REFRESH,
        }
    }
}
