//! Finding a destination's endpoints through DNS, and turning answers into a
//! stream of changes for the balancer.
//!
//! The sidecar asks Signpost DNS for `<svc>.<zone>` SRV: each answer names an
//! instance's address (from the additional section, or an A/AAAA lookup of
//! the target), its inbound port and its weight. When a name has no SRV
//! records at all (a plain DNS server, or records added by hand), the A/AAAA
//! addresses are used with [`DEFAULT_INBOUND_PORT`], because that is where a
//! sidecar listens unless told otherwise; SRV is preferred because it carries
//! the port and the weight.
//!
//! Resolution goes through the [`Resolve`] trait so tests (and embedders) can
//! inject a static table; [`DnsResolver`] is the hickory implementation that
//! talks only to the configured `--dns` server, never the system resolver.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use signpost_control_plane::model::ServiceName;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::discover::Change;
use tracing::{debug, warn};

/// The port a sidecar's inbound listens on by default; used for endpoints
/// known only by A/AAAA records.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

/// Weight of endpoints without an SRV weight: the control plane's default
/// instance weight, so A-only endpoints weigh the same as default ones.
pub const DEFAULT_WEIGHT: u16 = 100;

/// The shortest time between two resolutions of one name: a TTL of 0 must
/// not turn into a query per request.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Wait after a failed resolution (server down, timeout) before trying again;
/// the last good endpoints stay in use meanwhile.
pub const RETRY_AFTER_ERROR: Duration = Duration::from_secs(2);

/// One instance of a destination as DNS describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Where its sidecar's inbound listens.
    pub addr: SocketAddr,
    /// Its balancing weight (SRV weight; 0 is read as 1).
    pub weight: u16,
}

/// The answer for one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The healthy endpoints; empty when the service has none (or is unknown).
    pub endpoints: Vec<Endpoint>,
    /// How long the answer may be used.
    pub ttl: Duration,
}

/// Why a name could not be resolved (as opposed to resolving to nothing).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    /// The DNS server did not answer or answered with an error code.
    #[error("cannot resolve {name}: {reason}")]
    Dns {
        /// The name asked for.
        name: String,
        /// What the resolver said.
        reason: String,
    },
    /// The service name does not form a valid DNS name in the zone.
    #[error("{name:?} is not a valid DNS name: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What the parser said.
        reason: String,
    },
}

/// A boxed, sendable future, as [`Resolve`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that finds a service's endpoints.
pub trait Resolve: Send + Sync + 'static {
    /// Resolves `service` (a name in the sidecar's zone).
    fn resolve(
        &self,
        service: &ServiceName,
    ) -> BoxFuture<'static, Result<Resolution, ResolveError>>;
}

/// [`Resolve`] through hickory, asking exactly one DNS server.
#[derive(Clone)]
pub struct DnsResolver {
    resolver: Arc<TokioResolver>,
    zone: String,
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsResolver")
            .field("zone", &self.zone)
            .finish()
    }
}

impl DnsResolver {
    /// A resolver asking `server` (UDP, then TCP for truncated answers) for
    /// names under `zone`.
    pub fn new(server: SocketAddr, zone: &str) -> Result<Self, ResolveError> {
        let mut ns = NameServerConfig::udp_and_tcp(server.ip());
        for conn in &mut ns.connections {
            conn.port = server.port();
        }
        let config = ResolverConfig::from_parts(None, Vec::new(), vec![ns]);
        let mut opts = ResolverOpts::default();
        // Signpost DNS answers from memory on the same network: a lost UDP
        // packet should be retried quickly rather than after hickory's 5 s.
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        // Every name we ask is fully qualified; never try search domains.
        opts.ndots = 0;
        // The balancer re-resolves at TTL expiry; a cache in between would
        // only repeat what we already hold.
        opts.cache_size = 0;
        let resolver = Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| ResolveError::Dns {
                name: zone.to_string(),
                reason: format!("cannot build a resolver for {server}: {e}"),
            })?;
        Ok(Self {
            resolver: Arc::new(resolver),
            zone: zone.trim_end_matches('.').to_ascii_lowercase(),
        })
    }

    fn fqdn(&self, service: &ServiceName) -> Result<Name, ResolveError> {
        let text = format!("{}.{}.", service.as_str(), self.zone);
        Name::from_ascii(&text).map_err(|e| ResolveError::InvalidName {
            name: text,
            reason: e.to_string(),
        })
    }
}

fn remaining(valid_until: std::time::Instant) -> Duration {
    valid_until
        .saturating_duration_since(std::time::Instant::now())
        .max(MIN_REFRESH)
}

impl Resolve for DnsResolver {
    fn resolve(
        &self,
        service: &ServiceName,
    ) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        let this = self.clone();
        let name = self.fqdn(service);
        Box::pin(async move {
            let name = name?;
            let dns_err = |e: &dyn std::fmt::Display| ResolveError::Dns {
                name: name.to_string(),
                reason: e.to_string(),
            };
            let srv = match this.resolver.lookup(name.clone(), RecordType::SRV).await {
                Ok(lookup) => lookup,
                Err(err) if err.is_no_records_found() || err.is_nx_domain() => {
                    return this.resolve_addresses(&name).await;
                }
                Err(err) => return Err(dns_err(&err)),
            };
            let ttl = remaining(srv.valid_until());
            // Addresses of the targets, from the additional section.
            let mut addrs: HashMap<Name, Vec<IpAddr>> = HashMap::new();
            for record in srv.answers().iter().chain(srv.additionals()) {
                let ip = match &record.data {
                    RData::A(a) => IpAddr::V4(a.0),
                    RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                    _ => continue,
                };
                addrs
                    .entry(record.name.to_lowercase())
                    .or_default()
                    .push(ip);
            }
            let mut endpoints = BTreeMap::new();
            for record in srv.answers() {
                let RData::SRV(srv) = &record.data else {
                    continue;
                };
                let target = srv.target.to_lowercase();
                let ips = match addrs.get(&target) {
                    Some(ips) => ips.clone(),
                    // The answer did not fit the additional section: ask.
                    None => match this.resolver.lookup_ip(target.clone()).await {
                        Ok(ips) => ips.iter().collect(),
                        Err(err) => {
                            debug!(%target, %err, "SRV target has no address");
                            continue;
                        }
                    },
                };
                for ip in ips {
                    let addr = SocketAddr::new(ip, srv.port);
                    endpoints.insert(
                        addr,
                        Endpoint {
                            addr,
                            weight: srv.weight.max(1),
                        },
                    );
                }
            }
            if endpoints.is_empty() && srv.answers().is_empty() {
                return this.resolve_addresses(&name).await;
            }
            Ok(Resolution {
                endpoints: endpoints.into_values().collect(),
                ttl,
            })
        })
    }
}

impl DnsResolver {
    async fn resolve_addresses(&self, name: &Name) -> Result<Resolution, ResolveError> {
        match self.resolver.lookup_ip(name.clone()).await {
            Ok(ips) => {
                let ttl = remaining(ips.valid_until());
                let mut endpoints: Vec<Endpoint> = ips
                    .iter()
                    .map(|ip| Endpoint {
                        addr: SocketAddr::new(ip, DEFAULT_INBOUND_PORT),
                        weight: DEFAULT_WEIGHT,
                    })
                    .collect();
                endpoints.sort_by_key(|e| e.addr);
                endpoints.dedup();
                Ok(Resolution { endpoints, ttl })
            }
            Err(err) if err.is_no_records_found() || err.is_nx_domain() => {
                // No healthy instance (or no such service): nothing to send
                // to, asked again after the negative TTL.
                let ttl = match &err {
                    hickory_resolver::net::NetError::Dns(
                        hickory_resolver::net::DnsError::NoRecordsFound(nr),
                    ) => nr
                        .negative_ttl
                        .map(|s| Duration::from_secs(u64::from(s)))
                        .unwrap_or(MIN_REFRESH),
                    _ => MIN_REFRESH,
                };
                Ok(Resolution {
                    endpoints: Vec::new(),
                    ttl: ttl.max(MIN_REFRESH),
                })
            }
            Err(err) => Err(ResolveError::Dns {
                name: name.to_string(),
                reason: err.to_string(),
            }),
        }
    }
}

/// A fixed table of endpoints, for tests and for embedding without DNS.
/// Entries can be changed while destinations watch them.
#[derive(Debug, Clone, Default)]
pub struct StaticResolver {
    table: Arc<Mutex<HashMap<ServiceName, Vec<Endpoint>>>>,
    ttl: Duration,
}

impl StaticResolver {
    /// An empty table whose answers live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            table: Arc::default(),
            ttl: ttl.max(MIN_REFRESH),
        }
    }

    /// Sets the endpoints of `service` (weight [`DEFAULT_WEIGHT`]).
    pub fn set(&self, service: &ServiceName, addrs: &[SocketAddr]) {
        let endpoints = addrs
            .iter()
            .map(|&addr| Endpoint {
                addr,
                weight: DEFAULT_WEIGHT,
            })
            .collect();
        self.set_endpoints(service, endpoints);
    }

    /// Sets the endpoints of `service`.
    pub fn set_endpoints(&self, service: &ServiceName, endpoints: Vec<Endpoint>) {
        if let Ok(mut table) = self.table.lock() {
            table.insert(service.clone(), endpoints);
        }
    }
}

impl Resolve for StaticResolver {
    fn resolve(
        &self,
        service: &ServiceName,
    ) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        let endpoints = self
            .table
            .lock()
            .ok()
            .and_then(|t| t.get(service).cloned())
            .unwrap_or_default();
        let ttl = self.ttl;
        Box::pin(async move { Ok(Resolution { endpoints, ttl }) })
    }
}

/// What the balancer's users can see of a destination's discovery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryState {
    /// Whether a first answer (or error) came back.
    pub resolved: bool,
    /// How many endpoints the last answer had.
    pub endpoints: usize,
    /// The last resolution error, while no answer has come since.
    pub error: Option<String>,
}

/// A way for the data path to ask discovery to resolve again before the
/// answer's TTL runs out.
///
/// Waiting out the TTL is fine while the endpoints work, but not once one
/// refuses connections: an instance going away deregisters first, so DNS
/// already names its replacement while we still hold the old answer. In a
/// rolling restart whose instances linger less than a TTL, every endpoint we
/// know can be gone before the TTL ends, and retries have nowhere to go. So
/// a connection failure asks for a new answer now (at most one resolution
/// per [`MIN_REFRESH`]); an endpoint DNS still lists is left to the
/// balancer's penalty and to outlier ejection.
#[derive(Debug, Clone, Default)]
pub struct Refresh(Arc<Notify>);

impl Refresh {
    /// A handle no resolution watches yet; pass a clone to
    /// [`watch_endpoints`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for a resolution as soon as [`MIN_REFRESH`] allows. Requests
    /// made before that resolution starts fold into it.
    pub fn request(&self) {
        // `notify_one` keeps a permit when nobody waits, so a request made
        // during a resolution is not lost.
        self.0.notify_one();
    }

    /// Takes the request made so far, if any: whether one was pending.
    pub(crate) fn take_request(&self) -> bool {
        // Polling once takes a stored permit, if any; dropping the future
        // otherwise deregisters it.
        self.0.notified().now_or_never().is_some()
    }

    /// Resolves once a refresh is requested and `not_before` has passed.
    async fn requested(&self, not_before: Instant) {
        self.0.notified().await;
        tokio::time::sleep_until(not_before).await;
    }
}

/// The endpoints a destination last resolved to, kept beyond the
/// destination itself: a destination made again after it was dropped for
/// being idle starts from them, so it works at once, and goes on working
/// while DNS cannot be reached.
#[derive(Debug, Clone, Default)]
pub struct LastKnown(Arc<Mutex<Vec<Endpoint>>>);

impl LastKnown {
    /// The endpoints last known.
    pub fn get(&self) -> Vec<Endpoint> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sends the endpoints known to `changes`, for a destination made
    /// again; the discovery state to start from.
    pub fn seed(
        &self,
        changes: &mpsc::UnboundedSender<Change<SocketAddr, Endpoint>>,
    ) -> DiscoveryState {
        let known = self.get();
        if known.is_empty() {
            return DiscoveryState::default();
        }
        for ep in &known {
            let _ = changes.send(Change::Insert(ep.addr, *ep));
        }
        DiscoveryState {
            resolved: true,
            endpoints: known.len(),
            error: None,
        }
    }

    fn set(&self, endpoints: Vec<Endpoint>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = endpoints;
    }

    /// Whether none is known.
    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}

/// Re-resolves `service` whenever its answer expires, or sooner when
/// `refresh` asks, and sends the differences to `changes`, until `cancel`
/// fires or the receiver is gone.
///
/// A failed resolution keeps the endpoints already sent: a DNS outage must
/// not empty the balancer while the peers themselves are fine. It starts
/// from the endpoints in `known`, which the caller has sent already (see
/// [`LastKnown::seed`]), and keeps `known` current.
pub async fn watch_endpoints(
    resolver: Arc<dyn Resolve>,
    service: ServiceName,
    changes: mpsc::UnboundedSender<Change<SocketAddr, Endpoint>>,
    state: watch::Sender<DiscoveryState>,
    refresh: Refresh,
    known: LastKnown,
    cancel: CancellationToken,
) {
    let mut current: HashMap<SocketAddr, Endpoint> =
        known.get().into_iter().map(|e| (e.addr, e)).collect();
    loop {
        let started = Instant::now();
        // Requests made until now are answered by this resolution.
        refresh.take_request();
        let wait = match resolver.resolve(&service).await {
            Ok(resolution) => {
                let next: HashMap<SocketAddr, Endpoint> =
                    resolution.endpoints.iter().map(|e| (e.addr, *e)).collect();
                for addr in current.keys() {
                    if !next.contains_key(addr) && changes.send(Change::Remove(*addr)).is_err() {
                        return;
                    }
                }
                for (addr, ep) in &next {
                    // A weight change re-inserts, which replaces the service.
                    if current.get(addr) != Some(ep)
                        && changes.send(Change::Insert(*addr, *ep)).is_err()
                    {
                        return;
                    }
                }
                debug!(%service, endpoints = next.len(), ttl = ?resolution.ttl, "resolved");
                known.set(resolution.endpoints.clone());
                current = next;
                state.send_replace(DiscoveryState {
                    resolved: true,
                    endpoints: current.len(),
                    error: None,
                });
                resolution.ttl.max(MIN_REFRESH)
            }
            Err(err) => {
                warn!(%service, %err, "resolution failed; keeping the last endpoints");
                state.send_replace(DiscoveryState {
                    resolved: true,
                    endpoints: current.len(),
                    error: Some(err.to_string()),
                });
                RETRY_AFTER_ERROR
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = changes.closed() => return,
            () = tokio::time::sleep(wait) => {}
            () = refresh.requested(started + MIN_REFRESH) => {
                debug!(%service, "an endpoint failed; resolving before the TTL runs out");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> ServiceName {
        ServiceName::new(name).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn watch_sends_inserts_and_removes_as_answers_change() {
        let resolver = StaticResolver::new(Duration::from_secs(5));
        let user = svc("user");
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:1".parse().unwrap();
        resolver.set(&user, &[a, b]);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (state_tx, mut state) = watch::channel(DiscoveryState::default());
        let cancel = CancellationToken::new();
        tokio::spawn(watch_endpoints(
            Arc::new(resolver.clone()),
            user.clone(),
            tx,
            state_tx,
            Refresh::new(),
            LastKnown::default(),
            cancel.clone(),
        ));
        let mut inserted = Vec::new();
        for _ in 0..2 {
            match rx.recv().await.unwrap() {
                Change::Insert(addr, _) => inserted.push(addr),
                Change::Remove(_) => panic!("unexpected remove"),
            }
        }
        inserted.sort();
        assert_eq!(inserted, vec![a, b]);
        state.wait_for(|s| s.resolved).await.unwrap();
        assert_eq!(state.borrow().endpoints, 2);

        // The next answer, after the TTL, drops b.
        resolver.set(&user, &[a]);
        match rx.recv().await.unwrap() {
            Change::Remove(addr) => assert_eq!(addr, b),
            Change::Insert(..) => panic!("unexpected insert"),
        }
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn watch_stops_when_receiver_is_dropped() {
        let resolver = StaticResolver::new(Duration::from_secs(5));
        let (tx, rx) = mpsc::unbounded_channel();
        let (state_tx, _state) = watch::channel(DiscoveryState::default());
        let task = tokio::spawn(watch_endpoints(
            Arc::new(resolver),
            svc("user"),
            tx,
            state_tx,
            Refresh::new(),
            LastKnown::default(),
            CancellationToken::new(),
        ));
        drop(rx);
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_request_resolves_before_the_ttl_but_not_more_than_once_a_second() {
        let resolver = StaticResolver::new(Duration::from_secs(5));
        let user = svc("user");
        let old: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let new: SocketAddr = "127.0.0.2:1".parse().unwrap();
        resolver.set(&user, &[old]);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (state_tx, _state) = watch::channel(DiscoveryState::default());
        let refresh = Refresh::new();
        let cancel = CancellationToken::new();
        tokio::spawn(watch_endpoints(
            Arc::new(resolver.clone()),
            user.clone(),
            tx,
            state_tx,
            refresh.clone(),
            LastKnown::default(),
            cancel.clone(),
        ));
        assert!(matches!(rx.recv().await.unwrap(), Change::Insert(a, _) if a == old));
        let started = Instant::now();

        // The old instance deregistered and its replacement registered;
        // `old` refused a connection well before the 5 s TTL runs out.
        resolver.set(&user, &[new]);
        tokio::time::advance(Duration::from_millis(100)).await;
        refresh.request();
        refresh.request(); // folds into the same resolution
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(match rx.recv().await.unwrap() {
                Change::Insert(a, _) => format!("+{a}"),
                Change::Remove(a) => format!("-{a}"),
            });
        }
        got.sort();
        assert_eq!(got, [format!("+{new}"), format!("-{old}")]);
        assert_eq!(
            started.elapsed(),
            MIN_REFRESH,
            "resolved again once MIN_REFRESH allowed, not at the TTL"
        );

        // A request right after that waits out MIN_REFRESH again.
        resolver.set(&user, &[]);
        refresh.request();
        let asked = Instant::now();
        assert!(matches!(rx.recv().await.unwrap(), Change::Remove(a) if a == new));
        assert_eq!(asked.elapsed(), MIN_REFRESH);
        cancel.cancel();
    }
}
