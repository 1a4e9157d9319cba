//! Outlier ejection: taking a failing endpoint out of the balancer before DNS
//! catches up.
//!
//! An endpoint that fails [`EjectionConfig::consecutive_failures`] times in a
//! row (connection refused or reset, 502, 503, 504) is ejected for
//! `base × times ejected`, capped at [`EjectionConfig::max`]. Ejection is
//! expressed as *readiness*: an ejected endpoint's `poll_ready` stays pending
//! until its time is up, so tower's P2C balancer simply stops picking it and
//! picks it again once it is ready, with no extra bookkeeping in the balancer.
//! An endpoint that comes back is on probation: its first failure ejects it
//! again at once, its first success clears it.
//!
//! Never more than half of a destination's endpoints are ejected (as Envoy's
//! `max_ejection_percent`): when a whole service fails, ejecting everything
//! would only turn errors into "no endpoint", and the failures are more
//! likely the caller's or the network's than every peer's.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep};
use tower::Service;
use tracing::{info, warn};

/// Ejection settings.
#[derive(Debug, Clone, Copy)]
pub struct EjectionConfig {
    /// Failures in a row that eject an endpoint (5, as Envoy's default
    /// `consecutive_5xx`).
    pub consecutive_failures: u32,
    /// Ejection time for the first ejection; later ones last a multiple.
    pub base: Duration,
    /// The longest ejection.
    pub max: Duration,
    /// After this long without being ejected, an endpoint's ejection count
    /// starts over, so a failure a day later is not punished for last week's.
    pub forget_after: Duration,
    /// For how long a failed endpoint counts as "just failed", making the
    /// balancer prefer others (so a retry goes to another endpoint).
    ///
    /// Short (250 ms): the retry it protects follows the failure at once,
    /// and while it lasts the endpoint gets no traffic, so no failure can
    /// add up towards ejection. With two endpoints P2C always compares the
    /// same pair, so a failing endpoint is tried exactly once per penalty:
    /// 2 s made the five failures that eject take ten seconds, longer than
    /// a dead app takes to leave DNS, and the ejection never happened.
    /// At 250 ms it is out in about a second, each probe on the way costing
    /// a retry (or, for a request that cannot be retried, one error).
    pub failure_penalty: Duration,
}

impl Default for EjectionConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base: Duration::from_secs(30),
            max: Duration::from_secs(300),
            forget_after: Duration::from_secs(600),
            failure_penalty: Duration::from_millis(250),
        }
    }
}

/// How a request to an endpoint ended, as far as ejection cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response that says the endpoint works (anything but 502/503/504).
    Success,
    /// A connect failure, a reset, or a 502/503/504.
    Failure,
}

#[derive(Debug, Default)]
struct Health {
    consecutive: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    returned_at: Option<Instant>,
    probation: bool,
    last_failure: Option<Instant>,
}

impl Health {
    /// Nothing to remember: no failure since the last success, not ejected,
    /// not on probation. (`ejections` and `returned_at` are history, read
    /// only when a failure comes.)
    fn is_clean(&self) -> bool {
        self.consecutive == 0
            && self.ejected_until.is_none()
            && !self.probation
            && self.last_failure.is_none()
    }
}

/// The ejection state of one destination's endpoints.
#[derive(Debug)]
pub struct EjectionPool {
    config: EjectionConfig,
    /// Looked up per request while an endpoint is troubled: a fast hasher
    /// (the keys come from Signpost's own DNS answers, not from callers).
    members: Mutex<HashMap<SocketAddr, Health, foldhash::fast::RandomState>>,
    /// How many members are not [clean](Health::is_clean). While none is,
    /// a request needs no lookup, lock or clock here (see [`Self::is_calm`]).
    troubled: AtomicUsize,
    ejections: Counter,
}

impl EjectionPool {
    /// An empty pool; `ejections` counts every ejection.
    pub fn new(config: EjectionConfig, ejections: Counter) -> Self {
        Self {
            config,
            members: Mutex::default(),
            troubled: AtomicUsize::new(0),
            ejections,
        }
    }

    fn members(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Health, foldhash::fast::RandomState>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // in a way that matters more than losing ejection state.
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an endpoint (discovery found it). Known endpoints keep their state.
    pub fn insert(&self, addr: SocketAddr) {
        self.members().entry(addr).or_default();
    }

    /// Forgets an endpoint (discovery dropped it).
    pub fn remove(&self, addr: SocketAddr) {
        if let Some(health) = self.members().remove(&addr)
            && !health.is_clean()
        {
            self.troubled.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether every endpoint is clean: none failed since its last success,
    /// none is ejected or on probation. Then [`Self::ejected_until`] and
    /// [`Self::penalized`] are `None` and `false` for all, and a success
    /// changes nothing, so the per-request path skips them. Read without
    /// the lock: a failure recorded at this instant may be seen a request
    /// late, as it could be with the lock.
    pub fn is_calm(&self) -> bool {
        self.troubled.load(Ordering::Relaxed) == 0
    }

    /// Counts `health` in or out of the troubled after a change; `was_clean`
    /// is how it was before. Called with the lock held.
    fn track(&self, was_clean: bool, health: &Health) {
        match (was_clean, health.is_clean()) {
            (true, false) => {
                self.troubled.fetch_add(1, Ordering::Relaxed);
            }
            (false, true) => {
                self.troubled.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// How many endpoints are ejected now.
    pub fn ejected(&self, now: Instant) -> usize {
        self.members()
            .values()
            .filter(|h| h.ejected_until.is_some_and(|t| t > now))
            .count()
    }

    /// Until when `addr` is ejected; `None` when it may take traffic. An
    /// endpoint whose ejection ran out is put on probation here.
    pub fn ejected_until(&self, addr: SocketAddr, now: Instant) -> Option<Instant> {
        let mut members = self.members();
        let health = members.get_mut(&addr)?;
        match health.ejected_until {
            Some(until) if until > now => Some(until),
            Some(_) => {
                let was_clean = health.is_clean();
                health.ejected_until = None;
                health.returned_at = Some(now);
                health.probation = true;
                self.track(was_clean, health);
                info!(endpoint = %addr, "endpoint back from ejection, on probation");
                None
            }
            None => None,
        }
    }

    /// Whether `addr` failed within the failure penalty window.
    pub fn penalized(&self, addr: SocketAddr, now: Instant) -> bool {
        self.members()
            .get(&addr)
            .and_then(|h| h.last_failure)
            .is_some_and(|t| now.saturating_duration_since(t) < self.config.failure_penalty)
    }

    /// Records how a request to `addr` ended; returns the ejection time when
    /// this outcome ejected it.
    pub fn record(&self, addr: SocketAddr, outcome: Outcome, now: Instant) -> Option<Duration> {
        let mut members = self.members();
        // Counted only for a failure: a success must not cost a pass over
        // every endpoint.
        let (total, ejected) = match outcome {
            Outcome::Success => (0, 0),
            Outcome::Failure => (
                members.len(),
                members
                    .values()
                    .filter(|h| h.ejected_until.is_some_and(|t| t > now))
                    .count(),
            ),
        };
        let health = members.get_mut(&addr)?;
        let was_clean = health.is_clean();
        let ejected_for = self.apply(addr, health, outcome, now, total, ejected);
        self.track(was_clean, health);
        ejected_for
    }

    /// The state change of [`Self::record`], on `addr`'s `health`; `total`
    /// and `ejected` count the pool (only for a failure).
    fn apply(
        &self,
        addr: SocketAddr,
        health: &mut Health,
        outcome: Outcome,
        now: Instant,
        total: usize,
        ejected: usize,
    ) -> Option<Duration> {
        if health.ejected_until.is_some_and(|t| t > now) {
            // A late answer from before the ejection changes nothing.
            return None;
        }
        match outcome {
            Outcome::Success => {
                health.consecutive = 0;
                health.probation = false;
                health.last_failure = None;
                None
            }
            Outcome::Failure => {
                health.consecutive += 1;
                health.last_failure = Some(now);
                if !(health.probation || health.consecutive >= self.config.consecutive_failures) {
                    return None;
                }
                if ejected + 1 > total / 2 {
                    warn!(
                        endpoint = %addr,
                        failures = health.consecutive,
                        ejected,
                        total,
                        "endpoint keeps failing but half the endpoints are already ejected"
                    );
                    return None;
                }
                if health
                    .returned_at
                    .is_some_and(|t| now.saturating_duration_since(t) > self.config.forget_after)
                {
                    health.ejections = 0;
                }
                health.ejections += 1;
                let time = self
                    .config
                    .base
                    .saturating_mul(health.ejections)
                    .min(self.config.max);
                health.ejected_until = Some(now + time);
                health.consecutive = 0;
                health.probation = false;
                self.ejections.inc();
                warn!(endpoint = %addr, for_ = ?time, times = health.ejections, "endpoint ejected");
                Some(time)
            }
        }
    }
}

/// Classifies an answer (or its absence) for ejection.
pub fn outcome_of<R: Judged, E>(result: &Result<R, E>) -> Outcome {
    match result {
        Ok(answer) => answer.outcome(),
        Err(_) => Outcome::Failure,
    }
}

/// What an endpoint's answer says about its health, for ejection.
pub trait Judged {
    /// The outcome of a request that got this answer.
    fn outcome(&self) -> Outcome;
}

impl<B> Judged for http::Response<B> {
    fn outcome(&self) -> Outcome {
        match self.status() {
            http::StatusCode::BAD_GATEWAY
            | http::StatusCode::SERVICE_UNAVAILABLE
            | http::StatusCode::GATEWAY_TIMEOUT => Outcome::Failure,
            _ => Outcome::Success,
        }
    }
}

/// A connection made (a tunnel's answer): the endpoint works.
impl Judged for crate::outbound::endpoint::BoxedIo {
    fn outcome(&self) -> Outcome {
        Outcome::Success
    }
}

/// An endpoint service that reports outcomes to its pool and is not ready
/// while ejected.
pub struct Outlier<S> {
    inner: S,
    addr: SocketAddr,
    pool: Arc<EjectionPool>,
    wake: Option<Pin<Box<Sleep>>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Outlier<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outlier")
            .field("inner", &self.inner)
            .field("addr", &self.addr)
            .finish()
    }
}

impl<S> Outlier<S> {
    /// Wraps the service of endpoint `addr`, a member of `pool`.
    pub fn new(inner: S, addr: SocketAddr, pool: Arc<EjectionPool>) -> Self {
        pool.insert(addr);
        Self {
            inner,
            addr,
            pool,
            wake: None,
        }
    }
}

impl<S, Req> Service<Req> for Outlier<S>
where
    S: Service<Req>,
    S::Response: Judged + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Reported<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.pool.is_calm() {
            self.wake = None;
            return self.inner.poll_ready(cx);
        }
        loop {
            match self.pool.ejected_until(self.addr, Instant::now()) {
                Some(until) => {
                    // Pending until the ejection ends; the sleep registers
                    // the waker so the balancer polls us again then.
                    let sleep = self
                        .wake
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                    if sleep.deadline() != until {
                        sleep.as_mut().reset(until);
                    }
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                None => {
                    self.wake = None;
                    return self.inner.poll_ready(cx);
                }
            }
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        Reported {
            fut: self.inner.call(req),
            pool: self.pool.clone(),
            addr: self.addr,
        }
    }
}

pin_project_lite::pin_project! {
    /// An [`Outlier`]'s response: the endpoint's, with its outcome recorded
    /// in the pool when it comes. (Named, not boxed: no allocation per
    /// request.)
    #[derive(Debug)]
    pub struct Reported<F> {
        #[pin]
        fut: F,
        pool: Arc<EjectionPool>,
        addr: SocketAddr,
    }
}

impl<F, R, E> Future for Reported<F>
where
    F: Future<Output = Result<R, E>>,
    R: Judged,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let result = std::task::ready!(this.fut.poll(cx));
        let outcome = outcome_of(&result);
        if outcome == Outcome::Failure || !this.pool.is_calm() {
            this.pool.record(*this.addr, outcome, Instant::now());
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 15006))
    }

    fn pool_of(n: u8) -> EjectionPool {
        let pool = EjectionPool::new(EjectionConfig::default(), Counter::default());
        for i in 1..=n {
            pool.insert(addr(i));
        }
        pool
    }

    fn fail(pool: &EjectionPool, a: SocketAddr, times: u32) -> Option<Duration> {
        let mut last = None;
        for _ in 0..times {
            last = pool.record(a, Outcome::Failure, Instant::now());
        }
        last
    }

    #[tokio::test(start_paused = true)]
    async fn calm_until_a_failure_and_again_once_every_endpoint_recovered() {
        let pool = pool_of(4);
        assert!(pool.is_calm());
        pool.record(addr(1), Outcome::Success, Instant::now());
        assert!(
            pool.is_calm(),
            "a success on a clean endpoint changes nothing"
        );
        fail(&pool, addr(1), 1);
        fail(&pool, addr(2), 1);
        assert!(!pool.is_calm());
        assert!(pool.penalized(addr(1), Instant::now()));
        pool.record(addr(1), Outcome::Success, Instant::now());
        assert!(!pool.is_calm(), "addr 2 still failed last");
        pool.remove(addr(2));
        assert!(pool.is_calm(), "a removed endpoint takes its trouble along");

        // Ejected, back on probation, then a success: calm only at the end.
        assert!(fail(&pool, addr(3), 5).is_some());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(pool.ejected_until(addr(3), Instant::now()).is_none());
        assert!(!pool.is_calm(), "on probation");
        pool.record(addr(3), Outcome::Success, Instant::now());
        assert!(pool.is_calm());
    }

    #[tokio::test(start_paused = true)]
    async fn five_consecutive_failures_eject() {
        let pool = pool_of(4);
        assert_eq!(fail(&pool, addr(1), 4), None);
        assert_eq!(
            pool.record(addr(1), Outcome::Failure, Instant::now()),
            Some(Duration::from_secs(30))
        );
        assert!(pool.ejected_until(addr(1), Instant::now()).is_some());
        assert_eq!(pool.ejections.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let pool = pool_of(4);
        fail(&pool, addr(1), 4);
        pool.record(addr(1), Outcome::Success, Instant::now());
        assert_eq!(fail(&pool, addr(1), 4), None);
        assert!(pool.ejected_until(addr(1), Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_half_are_ejected() {
        let pool = pool_of(4);
        assert!(fail(&pool, addr(1), 5).is_some());
        assert!(fail(&pool, addr(2), 5).is_some());
        // Two of four are out: the third keeps serving, failing or not.
        assert_eq!(fail(&pool, addr(3), 10), None);
        assert_eq!(pool.ejected(Instant::now()), 2);

        let single = pool_of(1);
        assert_eq!(fail(&single, addr(1), 10), None);
    }

    #[tokio::test(start_paused = true)]
    async fn probation_reejects_on_first_failure_for_longer() {
        let pool = pool_of(2);
        assert_eq!(fail(&pool, addr(1), 5), Some(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(pool.ejected_until(addr(1), Instant::now()).is_none());
        // One failure on probation: out again, twice as long.
        assert_eq!(fail(&pool, addr(1), 1), Some(Duration::from_secs(60)));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(pool.ejected_until(addr(1), Instant::now()).is_none());
        // A success on probation clears it: one failure is just a failure.
        pool.record(addr(1), Outcome::Success, Instant::now());
        assert_eq!(fail(&pool, addr(1), 1), None);
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_endpoint_is_not_ready_until_it_returns() {
        let pool = Arc::new(pool_of(2));
        let (mock, mut handle) = tower_test::mock::pair::<(), http::Response<()>>();
        let mut svc = tower_test::mock::Spawn::new(Outlier::new(mock, addr(1), pool.clone()));
        handle.allow(100);
        for _ in 0..5 {
            assert!(svc.poll_ready().is_ready());
            let rsp = svc.call(());
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(http::Response::builder().status(503).body(()).unwrap());
            assert_eq!(rsp.await.unwrap().status(), 503);
        }
        assert!(svc.poll_ready().is_pending());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(svc.poll_ready().is_pending());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            svc.is_woken(),
            "the balancer must be woken when the ejection ends"
        );
        assert!(svc.poll_ready().is_ready());
    }
}
