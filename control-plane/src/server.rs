//! Wiring of one control-plane process: the catalog watch, the health
//! checker and the API, sharing one store and one metrics registry.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::auth::AuthConfig;
use crate::api::certs::CertAuthority;
use crate::api::{self, ApiMetrics, ApiPolicy, ApiState};
use crate::catalog::Catalog;
use crate::compactor::Compactor;
use crate::health::HealthChecker;
use crate::store::{Keys, Store};

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The API address could not be bound.
    #[error("cannot listen for the API on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// What a control plane needs.
pub struct ControlPlaneOptions {
    /// Where the API listens.
    pub api: SocketAddr,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The key layout.
    pub keys: Keys,
    /// Token checking.
    pub auth: AuthConfig,
    /// This replica's name among the health checkers and in elections
    /// (unique per replica).
    pub candidate: String,
    /// The mesh CA, if this control plane issues certificates.
    pub ca: Option<Arc<CertAuthority>>,
    /// History the store keeps: one elected control plane compacts older
    /// revisions away (see [`crate::compactor`]). `None`: no compaction.
    pub compaction: Option<std::time::Duration>,
    /// API settings from the server's flags.
    pub api_policy: ApiPolicy,
}

/// A running control plane.
pub struct ControlPlane {
    /// The catalog (shared with DNS when it runs in the same process).
    pub catalog: Arc<Catalog>,
    /// Where the API listens (useful with port 0).
    pub api_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl ControlPlane {
    /// Binds the API and starts the catalog watch, the health checker and the
    /// API. `registry` receives the API's metrics; register any other
    /// metrics into it before the call (it is frozen here).
    pub async fn start(
        opts: ControlPlaneOptions,
        mut registry: Registry,
        catalog: Option<Arc<Catalog>>,
        cancel: CancellationToken,
    ) -> Result<Self, ServerError> {
        let listener = TcpListener::bind(opts.api)
            .await
            .map_err(|source| ServerError::Bind {
                addr: opts.api,
                source,
            })?;
        let api_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: opts.api,
            source,
        })?;
        let catalog = catalog.unwrap_or_else(|| Catalog::new(opts.keys.clone()));
        let metrics = ApiMetrics::register(&mut registry);
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(
            catalog.clone().run(opts.store.clone(), cancel.clone()),
        ));
        if let Some(retention) = opts.compaction {
            let compactor = Compactor::new(
                opts.store.clone(),
                opts.keys.clone(),
                opts.candidate.clone(),
                retention,
            );
            tasks.push(tokio::spawn(compactor.run(cancel.clone())));
        }
        let checker = HealthChecker::new(
            opts.store.clone(),
            catalog.clone(),
            opts.candidate,
            &mut registry,
        );
        tasks.push(tokio::spawn(checker.run(cancel.clone())));
        let token_cache = crate::tokens::TokenCache::new();
        tasks.push(tokio::spawn(token_cache.clone().run(
            opts.store.clone(),
            opts.keys.clone(),
            cancel.clone(),
        )));
        let state = ApiState {
            store: opts.store,
            catalog: catalog.clone(),
            keys: opts.keys,
            auth: opts.auth,
            registry: Arc::new(registry),
            metrics,
            ca: opts.ca.clone(),
            policy: Arc::new(opts.api_policy),
            tokens: token_cache,
            auth_failures: Arc::new(crate::api::auth::AuthFailures::new()),
        };
        if let Some(ca) = opts.ca {
            let (store, keys) = (state.store.clone(), state.keys.clone());
            let cancel = cancel.clone();
            // Publish our root once the store answers, so every replica's
            // trust bundle includes it.
            tasks.push(tokio::spawn(async move {
                loop {
                    match ca.publish_root(&*store, &keys).await {
                        Ok(()) => return,
                        Err(err) => tracing::debug!(%err, "CA root not published yet"),
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                    }
                }
            }));
        }
        tasks.push(tokio::spawn(async move {
            if let Err(err) = api::serve(listener, state, cancel).await {
                tracing::error!(%err, "API server failed");
            }
        }));
        Ok(Self {
            catalog,
            api_addr,
            tasks,
        })
    }

    /// Waits for every task to finish (after the cancel token fired).
    pub async fn join(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
