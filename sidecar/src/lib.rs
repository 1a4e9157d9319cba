//! The per-instance sidecar proxy.
//!
//! This crate is responsible for one instance's place in the mesh: it gets a
//! certificate (`certificate`), registers and heartbeats the instance and
//! reports the app's health (`register`), accepts mutual-TLS traffic
//! inbound and applies the service's allow-list ([`inbound`]), and proxies
//! the app's outbound calls to peers found through Signpost DNS
//! ([`discovery`]), balancing, retrying and ejecting failing peers
//! ([`outbound`]); it carries opaque TCP over mesh TLS (`tunnel`) and
//! serves metrics and readiness (`admin`). It does not store anything:
//! the control plane owns the catalog, DNS serves it. The HTTP it speaks
//! on the wire, and where that goes below hyper, is in `transport`; the
//! order it starts and stops in is in `lifecycle`.
//!
//! Public are the modules the binary, the tests and embedders use: the
//! configuration, discovery, errors, metrics, mesh TLS, and the inbound
//! and outbound proxies. The rest is internal and may change.
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

pub mod config;
pub mod discovery;
pub mod error;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod tls;

pub(crate) mod admin;
pub(crate) mod body;
pub(crate) mod certificate;
pub(crate) mod deadline;
pub(crate) mod headers;
mod lifecycle;
pub(crate) mod register;
pub(crate) mod serve;
pub(crate) mod transport;
pub(crate) mod tunnel;
pub(crate) mod wake;

use std::net::SocketAddr;
use std::sync::Arc;

use signpost_control_plane::model::ServiceName;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

pub use crate::config::SidecarConfig;
pub use crate::discovery::{DnsResolver, Resolve, StaticResolver};
pub use crate::error::{ProxyError, SidecarError};
pub use crate::metrics::Metrics;

use crate::lifecycle::{Bound, Listeners};
use crate::register::Readiness;

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
        lifecycle::validate(&config)?;
        let listeners = Listeners::bind(&config).await?;
        let Bound {
            inbound,
            outbound,
            admin,
            upstreams,
        } = listeners.addresses(&config)?;
        let metrics = Metrics::new();
        let ready = Arc::new(Readiness::default());
        let span = info_span!("sidecar", service = %config.service, id = %config.id);
        let task = tokio::spawn(
            lifecycle::drive(
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
