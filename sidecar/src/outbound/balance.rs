//! Client-side balancing: tower's power-of-two-choices over peak-EWMA load,
//! with DNS weights and a penalty for endpoints that just failed.
//!
//! P2C picks two ready endpoints at random and sends to the one with the
//! lower load. The load here is tower's [`PeakEwma`] cost (latency × pending
//! requests) divided by the endpoint's weight, as linkerd's old `Weighted`
//! did, so an endpoint of weight 200 takes about twice the traffic of one of
//! weight 100 at equal latency. An endpoint that failed in the last moments
//! (see [`super::eject::EjectionConfig::failure_penalty`]) sorts after every
//! healthy one: a fast failure would otherwise look like the *cheapest*
//! endpoint, and a retry would likely go straight back to it.

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::Service;
use tower::balance::p2c::Balance;
use tower::discover::Change;
use tower::load::completion::CompleteOnResponse;
use tower::load::peak_ewma::Cost;
use tower::load::{Load, PeakEwma};

use super::eject::{EjectionPool, Outlier};
use crate::discovery::Endpoint;
use crate::wake::OnWake;

/// Latency assumed for an endpoint before it has answered: linkerd's
/// default, low enough that new endpoints get tried promptly.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// How fast the latency estimate forgets (linkerd's default): long enough to
/// smooth bursts, short enough to follow a peer that slowed down.
pub const DECAY: Duration = Duration::from_secs(10);

/// Reads the number inside tower's opaque [`Cost`].
///
/// tower 0.5's `Cost` offers ordering but no accessor or division (tower
/// 0.3 had `Div<Weight>`), and weighting needs the number. Its `Debug` form
/// is `Cost(<f64>)`; the `cost_debug_format_is_understood` test pins that so
/// a tower upgrade that changes it fails loudly instead of silently
/// unweighting the balancer. Formatting and parsing cost about as much as
/// the rest of the pick, so [`WeightedCost`] does it only when the weights
/// differ.
fn cost_value(cost: Cost) -> f64 {
    let text = format!("{cost:?}");
    text.strip_prefix("Cost(")
        .and_then(|t| t.strip_suffix(')'))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0.0)
}

/// The load metric the balancer compares: an endpoint that just failed
/// sorts after every other; otherwise the peak-EWMA cost divided by the
/// weight is lower for the better pick.
#[derive(Debug, Clone, Copy)]
pub struct WeightedCost {
    penalized: bool,
    cost: Cost,
    weight: f64,
}

impl WeightedCost {
    /// The cost divided by the weight (the penalty aside).
    fn per_weight(&self) -> f64 {
        cost_value(self.cost) / self.weight
    }
}

impl PartialOrd for WeightedCost {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        match self.penalized.cmp(&other.penalized) {
            Ordering::Equal => {}
            unequal => return Some(unequal),
        }
        // Equal weights, the usual case, compare the costs themselves.
        if self.weight == other.weight {
            self.cost.partial_cmp(&other.cost)
        } else {
            self.per_weight().partial_cmp(&other.per_weight())
        }
    }
}

impl PartialEq for WeightedCost {
    fn eq(&self, other: &Self) -> bool {
        self.partial_cmp(other) == Some(Ordering::Equal)
    }
}

/// An endpoint's key in the balancer: its address, hashed in one write.
///
/// tower's ready cache keeps its endpoints in `IndexMap`s with the std
/// hasher and hashes the key about eight times per request (moving the
/// picked endpoint to the pending set and back). `SocketAddr`'s derived
/// hash feeds SipHash four times (variant, length, octets, port); this
/// feeds it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointKey(pub SocketAddr);

impl Hash for EndpointKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self.0 {
            SocketAddr::V4(a) => {
                state.write_u64((u64::from(a.ip().to_bits()) << 16) | u64::from(a.port()));
            }
            SocketAddr::V6(a) => {
                state.write_u128(a.ip().to_bits());
                state.write_u16(a.port());
            }
        }
    }
}

/// An endpoint as the balancer sees it: peak-EWMA load divided by weight,
/// outlier detection inside.
pub struct Weighted<S> {
    inner: PeakEwma<Outlier<S>, CompleteOnResponse>,
    addr: SocketAddr,
    weight: f64,
    pool: Arc<EjectionPool>,
}

impl<S> std::fmt::Debug for Weighted<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weighted")
            .field("addr", &self.addr)
            .field("weight", &self.weight)
            .finish()
    }
}

impl<S> Weighted<S> {
    /// Wraps `svc`, the connection to `endpoint`, as a balancer member.
    pub fn new(svc: S, endpoint: Endpoint, pool: Arc<EjectionPool>) -> Self {
        let outlier = Outlier::new(svc, endpoint.addr, pool.clone());
        let inner = PeakEwma::new(
            outlier,
            DEFAULT_RTT,
            DECAY.as_nanos() as f64,
            CompleteOnResponse::default(),
        );
        Self {
            inner,
            addr: endpoint.addr,
            weight: f64::from(endpoint.weight.max(1)),
            pool,
        }
    }
}

impl<S> Load for Weighted<S> {
    type Metric = WeightedCost;

    fn load(&self) -> WeightedCost {
        WeightedCost {
            penalized: !self.pool.is_calm() && self.pool.penalized(self.addr, Instant::now()),
            cost: self.inner.load(),
            weight: self.weight,
        }
    }
}

impl<S, Req> Service<Req> for Weighted<S>
where
    Outlier<S>: Service<Req>,
{
    type Response = <PeakEwma<Outlier<S>, CompleteOnResponse> as Service<Req>>::Response;
    type Error = <PeakEwma<Outlier<S>, CompleteOnResponse> as Service<Req>>::Error;
    type Future = <PeakEwma<Outlier<S>, CompleteOnResponse> as Service<Req>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.inner.call(req)
    }
}

/// The stream of endpoint changes a [`Balance`] discovers from.
pub type DiscoverStream<S> = std::pin::Pin<
    Box<
        dyn Stream<Item = Result<Change<EndpointKey, Weighted<S>>, std::convert::Infallible>>
            + Send,
    >,
>;

/// Builds a P2C balancer fed by discovery changes; `connect` makes the
/// service of a newly found endpoint. Removed endpoints leave the ejection
/// pool too.
pub fn balancer<S, Req, F>(
    mut changes: mpsc::UnboundedReceiver<Change<SocketAddr, Endpoint>>,
    pool: Arc<EjectionPool>,
    mut connect: F,
) -> Balance<DiscoverStream<S>, Req>
where
    F: FnMut(Endpoint) -> S + Send + 'static,
    S: Send + 'static,
    Weighted<S>: Service<Req>,
    <Weighted<S> as Service<Req>>::Error: Into<tower::BoxError>,
{
    balance_changes(
        move |cx| changes.poll_recv(cx),
        pool,
        move |endpoint| (endpoint, connect(endpoint)),
    )
}

/// Builds `shards` P2C balancers fed by the same discovery changes, one per
/// worker thread (see [`super::shared`]). Each endpoint's service is made
/// once by `connect` and cloned into every shard, so the shards share its
/// connection; each shard keeps its own load estimate and ready set, and
/// all share the ejection `pool`. A task hands the changes to the shards;
/// it ends with discovery.
pub fn sharded_balancers<S, Req, F>(
    mut changes: mpsc::UnboundedReceiver<Change<SocketAddr, Endpoint>>,
    pool: Arc<EjectionPool>,
    shards: usize,
    mut connect: F,
) -> Vec<Balance<DiscoverStream<S>, Req>>
where
    F: FnMut(Endpoint) -> S + Send + 'static,
    S: Clone + Send + 'static,
    Weighted<S>: Service<Req>,
    <Weighted<S> as Service<Req>>::Error: Into<tower::BoxError>,
{
    let (senders, balancers): (Vec<_>, Vec<_>) = (0..shards.max(1))
        .map(|_| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Change<SocketAddr, (Endpoint, S)>>();
            let balance = balance_changes(move |cx| rx.poll_recv(cx), pool.clone(), |made| made);
            (tx, balance)
        })
        .unzip();
    tokio::spawn(async move {
        while let Some(change) = changes.recv().await {
            let sent = match change {
                Change::Insert(addr, endpoint) => {
                    let svc = connect(endpoint);
                    senders
                        .iter()
                        .filter(|tx| {
                            tx.send(Change::Insert(addr, (endpoint, svc.clone())))
                                .is_ok()
                        })
                        .count()
                }
                Change::Remove(addr) => senders
                    .iter()
                    .filter(|tx| tx.send(Change::Remove(addr)).is_ok())
                    .count(),
            };
            if sent == 0 {
                // Every shard is gone: the destination was dropped.
                return;
            }
        }
    });
    balancers
}

/// A P2C balancer over the changes that `poll_changes` yields; `made` turns
/// an inserted value into the endpoint and its service.
pub(crate) fn balance_changes<S, Req, V, P, F>(
    mut poll_changes: P,
    pool: Arc<EjectionPool>,
    mut made: F,
) -> Balance<DiscoverStream<S>, Req>
where
    P: FnMut(&mut std::task::Context<'_>) -> Poll<Option<Change<SocketAddr, V>>> + Send + 'static,
    F: FnMut(V) -> (Endpoint, S) + Send + 'static,
    S: Send + 'static,
    Weighted<S>: Service<Req>,
    <Weighted<S> as Service<Req>>::Error: Into<tower::BoxError>,
{
    let stream = futures::stream::poll_fn(move |cx| {
        poll_changes(cx).map(|change| {
            change.map(|change| {
                Ok(match change {
                    Change::Insert(addr, value) => {
                        let (endpoint, svc) = made(value);
                        Change::Insert(
                            EndpointKey(addr),
                            Weighted::new(svc, endpoint, pool.clone()),
                        )
                    }
                    Change::Remove(addr) => {
                        pool.remove(addr);
                        Change::Remove(EndpointKey(addr))
                    }
                })
            })
        })
    });
    // The balancer polls its discovery on every request; the channel is
    // looked at only when a change was sent.
    Balance::new(Box::pin(OnWake::new(stream)) as DiscoverStream<S>)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use prometheus_client::metrics::counter::Counter;
    use tower::ServiceExt;

    use super::*;
    use crate::outbound::eject::{EjectionConfig, Outcome};

    #[test]
    fn cost_debug_format_is_understood() {
        // tower's `Cost` is opaque; see `cost_value`.
        let svc = PeakEwma::new(
            tower::service_fn(|()| async { Ok::<_, ()>(()) }),
            Duration::from_millis(30),
            1e9,
            CompleteOnResponse::default(),
        );
        let value = cost_value(svc.load());
        assert!(value > 0.0, "could not read {:?}", svc.load());
    }

    fn cost(rtt_ms: u64) -> Cost {
        PeakEwma::new(
            tower::service_fn(|()| async { Ok::<_, ()>(()) }),
            Duration::from_millis(rtt_ms),
            1e9,
            CompleteOnResponse::default(),
        )
        .load()
    }

    #[test]
    fn weighted_cost_orders_by_penalty_then_cost_per_weight() {
        // Each `Cost` decays from the moment it is made: make each once.
        let (c1, c10, c20, c1000) = (cost(1), cost(10), cost(20), cost(1000));
        let of = |penalized, cost, weight| WeightedCost {
            penalized,
            cost,
            weight,
        };
        // Equal weights: the cost decides.
        assert!(of(false, c10, 1.0) < of(false, c20, 1.0));
        assert!(of(false, c20, 1.0) == of(false, c20, 1.0));
        // Weights divide: 20 ms at weight 4 is cheaper than 10 ms at 1.
        assert!(of(false, c20, 4.0) < of(false, c10, 1.0));
        assert!(of(false, c10, 1.0) < of(false, c20, 1.5));
        // A failed endpoint sorts after any other, whatever its cost.
        assert!(of(false, c1000, 1.0) < of(true, c1, 100.0));
        assert!(of(true, c10, 1.0) < of(true, c20, 1.0));
    }

    #[test]
    fn endpoint_keys_hash_equal_when_equal() {
        use std::hash::BuildHasher;
        let hasher = std::collections::hash_map::RandomState::new();
        let a: SocketAddr = "10.0.0.5:15006".parse().unwrap();
        let b: SocketAddr = "[fd00::5]:15006".parse().unwrap();
        assert_eq!(
            hasher.hash_one(EndpointKey(a)),
            hasher.hash_one(EndpointKey("10.0.0.5:15006".parse().unwrap()))
        );
        assert_ne!(
            hasher.hash_one(EndpointKey(a)),
            hasher.hash_one(EndpointKey("10.0.0.5:15007".parse().unwrap()))
        );
        assert_eq!(
            hasher.hash_one(EndpointKey(b)),
            hasher.hash_one(EndpointKey(b))
        );
    }

    /// An endpoint service answering at once with the endpoint's address.
    fn echo(
        endpoint: Endpoint,
    ) -> impl Service<
        (),
        Response = http::Response<SocketAddr>,
        Error = tower::BoxError,
        Future: Send,
    > + Send
    + 'static {
        tower::service_fn(move |()| async move { Ok(http::Response::new(endpoint.addr)) })
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 15006))
    }

    #[tokio::test(start_paused = true)]
    async fn weights_shape_the_traffic() {
        let (tx, rx) = mpsc::unbounded_channel();
        let pool = Arc::new(EjectionPool::new(
            EjectionConfig::default(),
            Counter::default(),
        ));
        let mut balance = balancer(rx, pool, echo);
        tx.send(Change::Insert(
            addr(1),
            Endpoint {
                addr: addr(1),
                weight: 100,
            },
        ))
        .unwrap();
        tx.send(Change::Insert(
            addr(2),
            Endpoint {
                addr: addr(2),
                weight: 400,
            },
        ))
        .unwrap();
        let mut seen: HashMap<SocketAddr, u32> = HashMap::new();
        // Keep requests in flight so the pending count drives the cost.
        let mut inflight = Vec::new();
        for _ in 0..200 {
            // A fresh coop budget each round: once tokio's budget runs out,
            // the ready cache cannot re-poll a just-called endpoint, and P2C
            // sees a single ready endpoint for that pick.
            tokio::task::yield_now().await;
            let fut = balance.ready().await.unwrap().call(());
            inflight.push(fut);
            if inflight.len() == 10 {
                for f in inflight.drain(..) {
                    *seen.entry(*f.await.unwrap().body()).or_default() += 1;
                }
            }
        }
        let (light, heavy) = (seen[&addr(1)], seen[&addr(2)]);
        assert!(
            heavy > light * 2,
            "weight 400 got {heavy}, weight 100 got {light}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn just_failed_endpoint_is_avoided() {
        let (tx, rx) = mpsc::unbounded_channel();
        let pool = Arc::new(EjectionPool::new(
            EjectionConfig::default(),
            Counter::default(),
        ));
        let mut balance = balancer(rx, pool.clone(), echo);
        for n in [1, 2] {
            tx.send(Change::Insert(
                addr(n),
                Endpoint {
                    addr: addr(n),
                    weight: 100,
                },
            ))
            .unwrap();
        }
        // P2C picks in `poll_ready`: use up that pick before the failure.
        balance.ready().await.unwrap().call(()).await.unwrap();
        pool.record(addr(1), Outcome::Failure, Instant::now());
        for _ in 0..20 {
            // A fresh coop budget each round: once tokio's budget runs out,
            // the ready cache cannot re-poll a just-called endpoint, and P2C
            // sees a single ready endpoint for that pick.
            tokio::task::yield_now().await;
            let rsp = balance.ready().await.unwrap().call(()).await.unwrap();
            assert_eq!(*rsp.body(), addr(2));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_endpoint_gets_nothing_and_removed_endpoint_leaves() {
        let (tx, rx) = mpsc::unbounded_channel();
        let pool = Arc::new(EjectionPool::new(
            EjectionConfig::default(),
            Counter::default(),
        ));
        let mut balance = balancer(rx, pool.clone(), echo);
        for n in [1, 2, 3] {
            tx.send(Change::Insert(
                addr(n),
                Endpoint {
                    addr: addr(n),
                    weight: 100,
                },
            ))
            .unwrap();
        }
        balance.ready().await.unwrap();
        for _ in 0..5 {
            pool.record(addr(1), Outcome::Failure, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(3)).await; // past the penalty
        tx.send(Change::Remove(addr(3))).unwrap();
        for _ in 0..30 {
            // A fresh coop budget each round: once tokio's budget runs out,
            // the ready cache cannot re-poll a just-called endpoint, and P2C
            // sees a single ready endpoint for that pick.
            tokio::task::yield_now().await;
            let rsp = balance.ready().await.unwrap().call(()).await.unwrap();
            assert_eq!(*rsp.body(), addr(2));
        }
        // Back after 30 s, on probation: with the other endpoint just
        // failed, P2C must pick it.
        tokio::time::advance(Duration::from_secs(30)).await;
        pool.record(addr(2), Outcome::Failure, Instant::now());
        let mut got = Vec::new();
        for _ in 0..30 {
            // A fresh coop budget each round: once tokio's budget runs out,
            // the ready cache cannot re-poll a just-called endpoint, and P2C
            // sees a single ready endpoint for that pick.
            tokio::task::yield_now().await;
            got.push(
                *balance
                    .ready()
                    .await
                    .unwrap()
                    .call(())
                    .await
                    .unwrap()
                    .body(),
            );
        }
        assert!(
            got.iter().all(|a| *a == addr(1)),
            "returned endpoint not picked: {got:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_shard_gets_the_changes_and_shares_each_endpoints_service() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        let (tx, rx) = mpsc::unbounded_channel();
        let pool = Arc::new(EjectionPool::new(
            EjectionConfig::default(),
            Counter::default(),
        ));
        let made = Arc::new(AtomicUsize::new(0));
        let counted = made.clone();
        let mut shards = sharded_balancers(rx, pool, 3, move |ep: Endpoint| {
            counted.fetch_add(1, Ordering::Relaxed);
            tower::service_fn(move |()| async move {
                Ok::<_, tower::BoxError>(http::Response::new(ep.addr))
            })
        });
        assert_eq!(shards.len(), 3);
        for n in [1, 2] {
            let ep = Endpoint {
                addr: addr(n),
                weight: 100,
            };
            tx.send(Change::Insert(ep.addr, ep)).unwrap();
        }
        tx.send(Change::Remove(addr(1))).unwrap();
        for balance in &mut shards {
            for _ in 0..10 {
                tokio::task::yield_now().await;
                let rsp = balance.ready().await.unwrap().call(()).await.unwrap();
                assert_eq!(*rsp.body(), addr(2), "a removed endpoint answered");
            }
        }
        assert_eq!(made.load(Ordering::Relaxed), 2, "one service per endpoint");
    }
}
