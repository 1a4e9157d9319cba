//! The outbound side: routing the local app's calls to peer sidecars.
//!
//! The outbound proxy is responsible for traffic from the local app to other
//! services: it finds the destination's endpoints through DNS
//! ([`crate::discovery`]), balances across them ([`balance`]), ejects
//! failing ones ([`eject`]), retries what is safe to retry ([`retry`]),
//! limits pending requests, and sends each request over one pooled HTTP/2
//! connection per peer ([`endpoint`]). The HTTP front that parses the app's
//! requests is [`proxy`].
//!
//! Per destination, the stack is, outermost first:
//! `PendingLimit → Retry → Shared → Balance(P2C) →
//! Weighted(PeakEwma) → Outlier → PeerConnection`. The request timeout wraps
//! the whole stack in [`proxy`], so it bounds retries too.
//!
//! A peer that refuses a connection or closes one asks discovery for a new
//! answer before the TTL runs out ([`crate::discovery::Refresh`]), so the
//! balancer learns of replacements while there is still an endpoint left to
//! retry on.
//!
//! # Threads
//!
//! The sidecar runs on one thread by default on one CPU, and on a
//! multi-threaded runtime with `--threads N`. What is shared between
//! requests, and what that costs with several threads:
//!
//! - The destinations in use ([`Destinations`]) are a map looked up on
//!   every request: it is read through an [`ArcSwap`] (no lock shared by
//!   the threads), and copied on the rare change (a new destination, a
//!   reap), under a lock only writers take.
//! - The balancer needs `&mut self` for each pick. [`shared::Shared`] keeps
//!   one per worker thread ([`balance::sharded_balancers`]), fed by the same
//!   discovery and sharing each peer's connection and the ejection pool, so
//!   workers do not queue on one lock; with one thread there is one, as
//!   before.
//! - Per peer, the pooled HTTP/2 connection is one for all threads: the
//!   `h2` crate locks its connection state for each stream, as hyper's
//!   client does, so requests to one peer from several threads still meet
//!   there, briefly.
//! - Per destination, the retry budget (tower's `TpsBudget`) takes a short
//!   lock per request; the pending limit and the metrics are atomics.

pub(crate) mod balance;
pub(crate) mod eject;
pub mod endpoint;
pub(crate) mod limit;
pub mod proxy;
pub(crate) mod retry;
pub(crate) mod shared;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{Request, Response};
use signpost_control_plane::model::{NameError, ServiceName};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tracing::{Instrument, debug, info_span};

use self::eject::{EjectionConfig, EjectionPool};
use self::endpoint::{Connect, PeerConnection, PeerProtocol};
use self::retry::RetryPolicy;
use crate::body::{BoxError, ProxyBody};
use crate::discovery::{DiscoveryState, LastKnown, Refresh, Resolve, watch_endpoints};
use crate::metrics::{Direction, Metrics, RequestMetrics, ServiceLabels};

/// The layers above a balancer `S`: see [`stack`].
pub type Stack<S> = limit::PendingLimit<tower::retry::Retry<RetryPolicy, shared::Shared<S>>>;

/// A destination's whole service stack. Named rather than boxed: a request
/// clones it (a few `Arc`s) and calls it, where a boxed stack would cost
/// an allocation for each of the two.
pub type DestinationService = Stack<PeerBalance>;

/// The balancer over a destination's peer connections (one per shard of
/// [`shared::Shared`]).
pub type PeerBalance =
    tower::balance::p2c::Balance<balance::DiscoverStream<PeerConnection>, Request<ProxyBody>>;

/// Makes the connector for a destination and protocol: mesh TLS expecting
/// that service's identity and negotiating the protocol, or plain TCP in
/// tests.
pub type MakeConnect = Arc<dyn Fn(&ServiceName, PeerProtocol) -> Arc<dyn Connect> + Send + Sync>;

/// Settings of the per-destination stacks.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// Limit for establishing a connection to a peer.
    pub connect_timeout: Duration,
    /// Pending requests per destination past which new ones get 503 at once.
    pub max_pending: usize,
    /// A destination unused this long is dropped (its DNS watch stops).
    pub idle_timeout: Duration,
    /// Outlier ejection settings.
    pub ejection: EjectionConfig,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            max_pending: 1000,
            idle_timeout: Duration::from_secs(300),
            ejection: EjectionConfig::default(),
        }
    }
}

/// Puts the layers above the balancer around `balance`: the pending limit
/// ([`limit::PendingLimit`]), retries, and the lock that lets every request share the
/// balancer ([`shared::Shared`]).
#[cfg(test)]
fn stack<S>(balance: S, policy: RetryPolicy, max_pending: usize) -> Stack<S>
where
    S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = BoxError>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    stack_shared(shared::Shared::new(balance), policy, max_pending)
}

/// [`stack`] over balancers already shared (one per worker thread).
fn stack_shared<S>(balance: shared::Shared<S>, policy: RetryPolicy, max_pending: usize) -> Stack<S>
where
    S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = BoxError>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    ServiceBuilder::new()
        .layer(limit::PendingLimitLayer::new(max_pending))
        .retry(policy)
        .service(balance)
}

/// One destination service: its stack and its discovery state.
pub struct Destination {
    /// The service name.
    pub name: ServiceName,
    service: DestinationService,
    state: watch::Receiver<DiscoveryState>,
    /// Set by each request, cleared by the idle reaper: a relaxed store
    /// per request instead of a lock and a clock read.
    used: AtomicBool,
    /// When the reaper last found `used` set (or the destination was made).
    last_seen: Mutex<Instant>,
    stop: CancellationToken,
    requests: RequestMetrics,
    authority: OnceLock<Option<Authority>>,
    /// What an opaque TCP tunnel to this service needs, shared with the
    /// HTTP stack: the endpoints, their ejection, the DNS refresh.
    discovery: TunnelParts,
    /// The tunnel balancer, made on the first tunnel.
    tunnel: OnceLock<Arc<crate::tunnel::Tunnel>>,
}

/// A destination's discovery and ejection state, for its tunnel.
struct TunnelParts {
    known: LastKnown,
    pool: Arc<EjectionPool>,
    refresh: Refresh,
    connector: Arc<dyn Connect>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("name", &self.name)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Destination {
    /// A handle to the stack for one request.
    pub fn service(&self) -> DestinationService {
        self.used.store(true, Ordering::Relaxed);
        self.service.clone()
    }

    /// The metrics of the requests sent here.
    pub fn requests(&self) -> &RequestMetrics {
        &self.requests
    }

    /// The `:authority` peers see, `<service>.<zone>`: made once, not per
    /// request. `None` when the zone makes it invalid.
    pub fn authority(&self, zone: &str) -> Option<Authority> {
        self.authority
            .get_or_init(|| format!("{}.{zone}", self.name).parse().ok())
            .clone()
    }

    /// The current state, if the first resolution came back: the common
    /// case, checked without waiting (or boxing a wait).
    pub fn resolved_now(&self) -> Option<DiscoveryState> {
        let state = self.state.borrow();
        state.resolved.then(|| state.clone())
    }

    /// The tunnel to this service (see [`crate::tunnel`]): balanced per
    /// connection by P2C over the same endpoints, ejections and DNS
    /// refreshes as its HTTP requests.
    pub fn tunnel(&self) -> Arc<crate::tunnel::Tunnel> {
        self.used.store(true, Ordering::Relaxed);
        self.tunnel
            .get_or_init(|| {
                let parts = &self.discovery;
                crate::tunnel::Tunnel::new(
                    self.name.clone(),
                    self.state.clone(),
                    parts.known.clone(),
                    parts.pool.clone(),
                    parts.refresh.clone(),
                    parts.connector.clone(),
                    parts.connect_timeout,
                )
            })
            .clone()
    }

    /// Waits for the first resolution and returns the current state.
    pub async fn resolved(&self) -> DiscoveryState {
        let mut state = self.state.clone();
        match state.wait_for(|s| s.resolved).await {
            Ok(s) => s.clone(),
            Err(_) => DiscoveryState::default(),
        }
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The destinations in use, created on first request and dropped when idle.
pub struct Destinations {
    resolver: Arc<dyn Resolve>,
    make_connect: MakeConnect,
    config: DestinationConfig,
    metrics: Metrics,
    /// On foldhash rather than std's SipHash: it is looked up on every
    /// request, and its keys are the few service names the local app calls.
    /// Read without a lock (see the module's threads); changed by copying,
    /// under `writing`.
    active: ArcSwap<ActiveMap>,
    /// Held by whoever changes `active`, so that two changes do not undo
    /// each other.
    writing: Mutex<()>,
    /// Balancers per destination: the runtime's worker threads.
    shards: usize,
    /// The endpoints each destination last resolved to, kept when it is
    /// dropped (see [`LastKnown`]); names that resolved to nothing are
    /// forgotten with their destination.
    known: Mutex<HashMap<ServiceName, LastKnown>>,
}

type ActiveMap = HashMap<ServiceName, Arc<Destination>, foldhash::fast::RandomState>;

impl std::fmt::Debug for Destinations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destinations")
            .field("config", &self.config)
            .finish()
    }
}

impl Destinations {
    /// An empty set of destinations.
    pub fn new(
        resolver: Arc<dyn Resolve>,
        make_connect: MakeConnect,
        config: DestinationConfig,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            resolver,
            make_connect,
            config,
            metrics,
            active: ArcSwap::default(),
            writing: Mutex::default(),
            shards: tokio::runtime::Handle::try_current()
                .map_or(1, |rt| rt.metrics().num_workers().max(1)),
            known: Mutex::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &DestinationConfig {
        &self.config
    }

    /// The destination `name`, created (and its discovery started) on first
    /// use. `name` is checked against the label rules only then: a name
    /// already in use is a valid one, so a request to it builds no
    /// [`ServiceName`].
    pub fn get(&self, name: &str) -> Result<Arc<Destination>, NameError> {
        if let Some(dest) = self.active.load().get(name) {
            return Ok(dest.clone());
        }
        Ok(self.insert(ServiceName::new(name)?))
    }

    /// The destination `name`, made unless another request just made it.
    fn insert(&self, name: ServiceName) -> Arc<Destination> {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let active = self.active.load_full();
        if let Some(dest) = active.get(&name) {
            return dest.clone();
        }
        let dest = Arc::new(self.build(&name));
        let mut next = ActiveMap::clone(&active);
        next.insert(name, dest.clone());
        self.active.store(Arc::new(next));
        dest
    }

    fn build(&self, name: &ServiceName) -> Destination {
        let labels = ServiceLabels {
            service: name.to_string(),
        };
        let known = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.clone())
            .or_default()
            .clone();
        let known_now = known.clone();
        let (changes_tx, changes_rx) = mpsc::unbounded_channel();
        let (state_tx, state_rx) = watch::channel(known.seed(&changes_tx));
        let stop = CancellationToken::new();
        let refresh = Refresh::new();
        tokio::spawn(
            watch_endpoints(
                self.resolver.clone(),
                name.clone(),
                changes_tx,
                state_tx,
                refresh.clone(),
                known,
                stop.clone(),
            )
            .instrument(info_span!("discovery", service = %name)),
        );
        // Keep the endpoints gauge current from the discovery state.
        let gauge = self.metrics.endpoints.get_or_create(&labels).clone();
        let mut watch_state = state_rx.clone();
        let stop_gauge = stop.clone();
        tokio::spawn(async move {
            loop {
                gauge.set(i64::try_from(watch_state.borrow_and_update().endpoints).unwrap_or(0));
                tokio::select! {
                    () = stop_gauge.cancelled() => { gauge.set(0); return; }
                    changed = watch_state.changed() => if changed.is_err() { return; },
                }
            }
        });

        let pool = Arc::new(EjectionPool::new(
            self.config.ejection,
            self.metrics.ejections.get_or_create(&labels).clone(),
        ));
        let connector = (self.make_connect)(name, PeerProtocol::Http2);
        let upgrades = (self.make_connect)(name, PeerProtocol::Http1);
        let connect_timeout = self.config.connect_timeout;
        let discovery = TunnelParts {
            known: known_now,
            pool: pool.clone(),
            refresh: refresh.clone(),
            connector: (self.make_connect)(name, PeerProtocol::Tcp),
            connect_timeout,
        };
        let connect = move |ep: crate::discovery::Endpoint| {
            PeerConnection::new(ep.addr, connector.clone(), connect_timeout)
                .with_refresh(refresh.clone())
                .with_upgrades(upgrades.clone())
        };
        let balance = if self.shards == 1 {
            shared::Shared::new(balance::balancer(changes_rx, pool, connect))
        } else {
            shared::Shared::sharded(balance::sharded_balancers(
                changes_rx,
                pool,
                self.shards,
                connect,
            ))
        };
        let policy = RetryPolicy::new(
            retry::budget(),
            self.metrics.retries.get_or_create(&labels).clone(),
        );
        Destination {
            name: name.clone(),
            service: stack_shared(balance, policy, self.config.max_pending),
            state: state_rx,
            used: AtomicBool::new(false),
            last_seen: Mutex::new(Instant::now()),
            stop,
            requests: self.metrics.requests_of(Direction::Outbound, name.as_str()),
            authority: OnceLock::new(),
            discovery,
            tunnel: OnceLock::new(),
        }
    }

    /// An opaque TCP tunnel to `name` (what `CONNECT` to a mesh name
    /// carries when its bytes are not HTTP, and what an `--upstream` port
    /// carries), balanced per connection: see [`Destination::tunnel`].
    pub fn tunnel(&self, name: &ServiceName) -> Arc<crate::tunnel::Tunnel> {
        let dest = match self.active.load().get(name) {
            Some(dest) => dest.clone(),
            None => self.insert(name.clone()),
        };
        dest.tunnel()
    }

    /// Drops destinations unused for the idle timeout, every minute, until
    /// `cancel` fires.
    pub async fn run_idle_reaper(self: Arc<Self>, cancel: CancellationToken) {
        let period = (self.config.idle_timeout / 5).max(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            self.reap(Instant::now());
        }
    }

    /// Drops destinations idle at `now`: not used since the reap that
    /// came an idle timeout before. A use counts from the first reap after
    /// it, so a destination lives up to one reaper period longer.
    pub fn reap(&self, now: Instant) {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut active = ActiveMap::clone(&self.active.load());
        active.retain(|name, dest| {
            let mut last = dest.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            if dest.used.swap(false, Ordering::Relaxed) {
                *last = now;
            }
            let keep = now.saturating_duration_since(*last) < self.config.idle_timeout;
            if !keep {
                debug!(service = %name, "dropping idle destination");
            }
            keep
        });
        // Kept for the names in use and those that had endpoints; a name
        // that never resolved to any is not worth remembering.
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, known| active.contains_key(name) || !known.is_empty());
        self.active.store(Arc::new(active));
    }

    /// How many destinations are active.
    pub fn len(&self) -> usize {
        self.active.load().len()
    }

    /// Whether no destination is active.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::StaticResolver;
    use crate::outbound::endpoint::TcpConnect;

    fn destinations() -> Arc<Destinations> {
        let resolver = StaticResolver::new(Duration::from_secs(5));
        let make: MakeConnect =
            Arc::new(|_: &ServiceName, _| Arc::new(TcpConnect) as Arc<dyn Connect>);
        Destinations::new(
            Arc::new(resolver),
            make,
            DestinationConfig::default(),
            Metrics::new(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn idle_destinations_are_dropped_and_stop_resolving() {
        let destinations = destinations();
        let dest = destinations.get("user").unwrap();
        assert!(Arc::ptr_eq(&dest, &destinations.get("user").unwrap()));
        assert!(destinations.get("no_such").is_err());
        assert_eq!(dest.resolved().await.endpoints, 0);
        let stop = dest.stop.clone();
        drop(dest);

        assert_eq!(
            reap_after(&destinations, 299).await,
            1,
            "made 299 s ago: kept"
        );
        assert_eq!(reap_after(&destinations, 2).await, 0);
        assert!(
            stop.is_cancelled(),
            "discovery of a dropped destination stops"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_requests_on_two_threads_make_one_destination_with_a_balancer_each() {
        let destinations = destinations();
        assert_eq!(destinations.shards, 2);
        let got = futures::future::join_all((0..16).map(|_| {
            let destinations = destinations.clone();
            tokio::spawn(async move { destinations.get("user").unwrap() })
        }))
        .await;
        let first = got[0].as_ref().unwrap();
        assert!(got.iter().all(|d| Arc::ptr_eq(d.as_ref().unwrap(), first)));
        assert_eq!(destinations.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_in_use_is_kept() {
        let destinations = destinations();
        let dest = destinations.get("user").unwrap();
        // The default idle timeout is 300 s; a use is seen by the next reap.
        for _ in 0..3 {
            drop(dest.service());
            assert_eq!(reap_after(&destinations, 200).await, 1, "in use: kept");
        }
        // The last use was seen by the reap 200 s after it.
        drop(dest.service());
        assert_eq!(reap_after(&destinations, 200).await, 1);
        assert_eq!(
            reap_after(&destinations, 299).await,
            1,
            "seen 299 s ago: kept"
        );
        assert_eq!(reap_after(&destinations, 2).await, 0);
    }

    /// Answers once, then fails as an unreachable DNS server does.
    struct Once(std::sync::atomic::AtomicBool);

    impl Resolve for Once {
        fn resolve(
            &self,
            _: &ServiceName,
        ) -> crate::discovery::BoxFuture<
            'static,
            Result<crate::discovery::Resolution, crate::discovery::ResolveError>,
        > {
            let first = !self.0.swap(true, Ordering::SeqCst);
            Box::pin(async move {
                if first {
                    Ok(crate::discovery::Resolution {
                        endpoints: vec![crate::discovery::Endpoint {
                            addr: addr(1),
                            weight: 100,
                        }],
                        ttl: Duration::from_secs(5),
                    })
                } else {
                    Err(crate::discovery::ResolveError::Dns {
                        name: "user.xingren.host.".into(),
                        reason: "timed out".into(),
                    })
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_dropped_while_dns_is_down_comes_back_with_its_endpoints() {
        let make: MakeConnect =
            Arc::new(|_: &ServiceName, _| Arc::new(TcpConnect) as Arc<dyn Connect>);
        let destinations = Destinations::new(
            Arc::new(Once(std::sync::atomic::AtomicBool::new(false))),
            make,
            DestinationConfig::default(),
            Metrics::new(),
        );
        let dest = destinations.get("user").unwrap();
        assert_eq!(dest.resolved().await.endpoints, 1);
        drop(dest);
        // DNS is down from here on; the destination idles out.
        assert_eq!(reap_after(&destinations, 301).await, 0);
        let again = destinations.get("user").unwrap();
        let state = again
            .resolved_now()
            .expect("resolved at once, from the last answer");
        assert_eq!(state.endpoints, 1);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(again.resolved().await.endpoints, 1, "kept while DNS fails");
    }

    /// Advances the clock by `secs`, reaps, and counts what is left.
    async fn reap_after(destinations: &Destinations, secs: u64) -> usize {
        tokio::time::advance(Duration::from_secs(secs)).await;
        destinations.reap(Instant::now());
        destinations.len()
    }

    fn addr(n: u8) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, n], 15006))
    }

    /// Endpoint 1 answers 503 as a peer sidecar whose app was killed does;
    /// the others answer 200. Each answer names the endpoint.
    fn one_app_down(
        ep: crate::discovery::Endpoint,
    ) -> impl tower::Service<
        Request<ProxyBody>,
        Response = Response<ProxyBody>,
        Error = BoxError,
        Future: Send,
    > + Send
    + 'static {
        tower::service_fn(move |_: Request<ProxyBody>| async move {
            let status = if ep.addr == addr(1) { 503 } else { 200 };
            Ok(Response::builder()
                .status(status)
                .header("x-endpoint", ep.addr.to_string())
                .body(crate::body::empty())
                .unwrap())
        })
    }

    #[tokio::test(start_paused = true)]
    async fn endpoint_whose_app_died_is_ejected_within_seconds_and_fails_no_request() {
        use tower::discover::Change;
        use tower::{Service, ServiceExt};

        use crate::body::empty;
        use crate::discovery::Endpoint;
        use prometheus_client::metrics::counter::Counter;

        let (tx, rx) = mpsc::unbounded_channel();
        let ejections = Counter::default();
        let pool = Arc::new(EjectionPool::new(
            EjectionConfig::default(),
            ejections.clone(),
        ));
        for n in [1, 2] {
            let ep = Endpoint {
                addr: addr(n),
                weight: 100,
            };
            tx.send(Change::Insert(ep.addr, ep)).unwrap();
        }
        let retries = Counter::default();
        let service = stack(
            balance::balancer(rx, pool.clone(), one_app_down),
            RetryPolicy::new(retry::budget(), retries.clone()),
            100,
        );
        // A steady stream, one GET every 10 ms, as in the mesh test.
        let started = Instant::now();
        let mut ejected_after = None;
        let mut to_dead = 0;
        for i in 0..300 {
            // No `Replay`: a GET's empty body is replayed as it is.
            let req = Request::new(empty());
            let rsp = service
                .clone()
                .ready()
                .await
                .unwrap()
                .call(req)
                .await
                .unwrap();
            assert_eq!(rsp.status(), 200, "request {i} failed");
            if pool.ejected_until(addr(1), Instant::now()).is_some() {
                ejected_after.get_or_insert(started.elapsed());
            } else {
                to_dead = i;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let after = ejected_after.expect("the endpoint answering 503 was never ejected");
        assert!(
            after < Duration::from_secs(2),
            "ejected only after {after:?}"
        );
        assert_eq!(ejections.get(), 1);
        // Every request that met the dead app was retried on the other one.
        assert_eq!(retries.get(), 5, "last probe at request {to_dead}");
    }
}
