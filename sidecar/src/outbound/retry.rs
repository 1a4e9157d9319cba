//! Retrying a failed request once on another endpoint, within a budget.
//!
//! A request is retried when it can be sent again (its body is empty, or
//! was buffered, see [`crate::body::Replay`]: idempotent requests without a
//! body always qualify, any request with a body of at most 64 KiB too) and
//! it failed in a way that says the peer did not handle it: the connection
//! could not be made, it was reset before a response, or the peer answered
//! 503. At most one retry per request, and retries as a whole stay within
//! 20 % of requests (tower's [`TpsBudget`], as Finagle and linkerd do), so a
//! sick service is not hit with twice its load.
//!
//! The retry goes to another endpoint because the balancer penalizes the
//! endpoint that just failed (see [`super::balance`]).

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body::Body as _;
use prometheus_client::metrics::counter::Counter;
use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};
use tracing::debug;

use super::endpoint::{EndpointError, find_endpoint_error};
use crate::body::{BoxError, ProxyBody, Replay, empty, full};

/// Fraction of requests that may be retried.
pub const RETRY_RATIO: f32 = 0.2;

/// Retries allowed per second regardless of the ratio, so a client sending
/// little traffic can still retry its occasional failure.
pub const MIN_RETRIES_PER_SECOND: u32 = 10;

/// The window over which the budget counts requests.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// The retry budget of one destination.
pub fn budget() -> Arc<TpsBudget> {
    Arc::new(TpsBudget::new(
        BUDGET_WINDOW,
        MIN_RETRIES_PER_SECOND,
        RETRY_RATIO,
    ))
}

/// The retry policy; cloned per request by [`tower::retry::Retry`].
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    budget: Arc<TpsBudget>,
    retries: Counter,
    deposited: bool,
    /// A copy of this request is held (its body was empty or had a
    /// [`Replay`]).
    replayable: bool,
    retried: bool,
}

impl RetryPolicy {
    /// A policy drawing on `budget`, counting retries in `retries`.
    pub fn new(budget: Arc<TpsBudget>, retries: Counter) -> Self {
        Self {
            budget,
            retries,
            deposited: false,
            replayable: false,
            retried: false,
        }
    }
}

/// Whether a failure shows the request was not processed by the peer.
fn retryable_error(err: &BoxError) -> bool {
    matches!(
        find_endpoint_error(&**err),
        Some(EndpointError::Connect(_) | EndpointError::Reset { .. })
    )
}

impl Policy<Request<ProxyBody>, Response<ProxyBody>, BoxError> for RetryPolicy {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<ProxyBody>,
        result: &mut Result<Response<ProxyBody>, BoxError>,
    ) -> Option<Self::Future> {
        if self.retried || !self.replayable {
            return None;
        }
        let failed = match result {
            Ok(rsp) => rsp.status() == StatusCode::SERVICE_UNAVAILABLE,
            Err(err) => retryable_error(err),
        };
        if !failed {
            return None;
        }
        if !self.budget.withdraw() {
            debug!("retry budget exhausted; not retrying");
            return None;
        }
        self.retried = true;
        self.retries.inc();
        debug!("retrying on another endpoint");
        Some(std::future::ready(()))
    }

    fn clone_request(&mut self, req: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
        if !self.deposited {
            // Every original request earns retry credit, retryable or not.
            self.budget.deposit();
            self.deposited = true;
        }
        let body = match req.extensions().get::<Replay>() {
            Some(replay) => full(replay.0.clone()),
            // Nothing to copy, and no extension to look for: most requests.
            None if req.body().is_end_stream() => empty(),
            None => return None,
        };
        let mut clone = Request::new(body);
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        // Retried at most once: the copy needs no `Replay` of its own.
        self.replayable = true;
        Some(clone)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tower::{Service, ServiceExt};
    use tower_test::mock;

    use super::*;
    use crate::body;
    use crate::outbound::endpoint::ConnectError;

    fn request() -> Request<ProxyBody> {
        let mut req = Request::new(body::full("x"));
        req.extensions_mut()
            .insert(Replay(bytes::Bytes::from_static(b"x")));
        req
    }

    fn refused() -> BoxError {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Box::new(EndpointError::Connect(ConnectError::Tcp {
            addr,
            source: std::io::ErrorKind::ConnectionRefused.into(),
        }))
    }

    fn status(code: u16) -> Response<ProxyBody> {
        Response::builder().status(code).body(empty()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn connect_failure_is_retried_once() {
        let (svc, mut handle) = mock::pair::<Request<ProxyBody>, Response<ProxyBody>>();
        let retries = Counter::default();
        let mut svc = tower::retry::Retry::new(RetryPolicy::new(budget(), retries.clone()), svc);
        let fut = svc.ready().await.unwrap().call(request());
        let answer = tokio::spawn(fut);
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(refused());
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(status(200));
        assert_eq!(answer.await.unwrap().unwrap().status(), 200);
        assert_eq!(retries.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_without_a_body_is_retried_without_a_replay() {
        let (svc, mut handle) = mock::pair::<Request<ProxyBody>, Response<ProxyBody>>();
        let retries = Counter::default();
        let mut svc = tower::retry::Retry::new(RetryPolicy::new(budget(), retries.clone()), svc);
        let req = Request::builder()
            .method("DELETE")
            .uri("/users/1")
            .header("x-kept", "1")
            .body(empty())
            .unwrap();
        let answer = tokio::spawn(svc.ready().await.unwrap().call(req));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(status(503));
        let (again, send) = handle.next_request().await.unwrap();
        assert_eq!(again.method(), "DELETE");
        assert_eq!(again.uri(), "/users/1");
        assert_eq!(again.headers()["x-kept"], "1");
        assert!(again.body().is_end_stream());
        send.send_response(status(200));
        assert_eq!(answer.await.unwrap().unwrap().status(), 200);
        assert_eq!(retries.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_failure_is_returned() {
        let (svc, mut handle) = mock::pair::<Request<ProxyBody>, Response<ProxyBody>>();
        let mut svc = tower::retry::Retry::new(RetryPolicy::new(budget(), Counter::default()), svc);
        let answer = tokio::spawn(svc.ready().await.unwrap().call(request()));
        for _ in 0..2 {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(status(503));
        }
        assert_eq!(answer.await.unwrap().unwrap().status(), 503);
    }

    #[tokio::test(start_paused = true)]
    async fn other_failures_and_unreplayable_requests_are_not_retried() {
        let (svc, mut handle) = mock::pair::<Request<ProxyBody>, Response<ProxyBody>>();
        let retries = Counter::default();
        let mut svc = tower::retry::Retry::new(RetryPolicy::new(budget(), retries.clone()), svc);
        // 500 is the app's answer, not the mesh's: it goes back as is.
        let answer = tokio::spawn(svc.ready().await.unwrap().call(request()));
        handle
            .next_request()
            .await
            .unwrap()
            .1
            .send_response(status(500));
        assert_eq!(answer.await.unwrap().unwrap().status(), 500);
        // A streamed body cannot be sent twice.
        let answer = tokio::spawn(
            svc.ready()
                .await
                .unwrap()
                .call(Request::new(body::full("big"))),
        );
        handle.next_request().await.unwrap().1.send_error(refused());
        assert!(answer.await.unwrap().is_err());
        assert_eq!(retries.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_caps_retries_at_a_fifth_of_requests() {
        // No per-second allowance, so only the 20 % ratio counts.
        let budget = Arc::new(TpsBudget::new(BUDGET_WINDOW, 0, RETRY_RATIO));
        let policy = RetryPolicy::new(budget, Counter::default());
        let mut retried = 0;
        for _ in 0..100 {
            let mut p = policy.clone();
            let mut req = p.clone_request(&request()).unwrap();
            let mut result = Ok(status(503));
            if p.retry(&mut req, &mut result).is_some() {
                retried += 1;
            }
        }
        assert!((15..=20).contains(&retried), "retried {retried} of 100");
    }
}
