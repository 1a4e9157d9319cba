//! Retrying a failed request once on another endpoint, within a budget.
//!
//! The rule: a request is sent again only when it certainly did not reach
//! the peer's app, or when running it twice is harmless.
//!
//! - Certainly not processed, any method: no connection could be made;
//!   the peer refused the stream (`REFUSED_STREAM`) or sent a graceful
//!   GOAWAY below its id (RFC 9113 §8.7); or the peer's sidecar answered
//!   503 with `x-signpost-not-forwarded` (its app was down, say).
//! - Idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE, TRACE; RFC 9110
//!   §9.2.2) also after other failures once sent: the connection broke off,
//!   or a 503.
//! - Never a POST or PATCH that may have run: its caller gets 502 saying
//!   it may have been processed.
//!
//! The body must be whole to be sent again: empty, or recorded while it
//! was sent (see [`crate::body::record`], up to 64 KiB). At most one retry
//! per request, and retries as a whole stay within 20 % of requests
//! (tower's [`TpsBudget`], as Finagle and linkerd do), so a sick service
//! is not hit with twice its load.
//!
//! The retry goes to another endpoint because the balancer penalizes the
//! endpoint that just failed (see [`super::balance`]).

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use prometheus_client::metrics::counter::Counter;
use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};
use tracing::debug;

use super::endpoint::{EndpointError, find_endpoint_error};
use crate::body::{BoxError, ProxyBody, Replay, empty};
use crate::error::NOT_FORWARDED_HEADER;

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

/// What a failed attempt says about the request.
enum Failure {
    /// The peer's app certainly did not see it.
    Unprocessed,
    /// It may have been processed.
    Sent,
}

fn failure(result: &Result<Response<ProxyBody>, BoxError>) -> Option<Failure> {
    match result {
        Ok(rsp) if rsp.status() == StatusCode::SERVICE_UNAVAILABLE => {
            if rsp.headers().contains_key(NOT_FORWARDED_HEADER) {
                Some(Failure::Unprocessed)
            } else {
                Some(Failure::Sent)
            }
        }
        Ok(_) => None,
        Err(err) => match find_endpoint_error(&**err) {
            Some(e) if e.is_unprocessed() => Some(Failure::Unprocessed),
            Some(EndpointError::Reset { .. }) => Some(Failure::Sent),
            _ => None,
        },
    }
}

/// Whether running the method twice has the effect of running it once
/// (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl Policy<Request<ProxyBody>, Response<ProxyBody>, BoxError> for RetryPolicy {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        req: &mut Request<ProxyBody>,
        result: &mut Result<Response<ProxyBody>, BoxError>,
    ) -> Option<Self::Future> {
        if self.retried || !self.replayable {
            return None;
        }
        match failure(result)? {
            Failure::Unprocessed => {}
            Failure::Sent if is_idempotent(req.method()) => {}
            Failure::Sent => {
                debug!(method = %req.method(), "may have been processed; not sent again");
                return None;
            }
        }
        // The copy's body is whole only once the first attempt has read
        // all of it or given it back.
        if let Some(replay) = req.extensions().get::<Replay>()
            && !replay.ready()
        {
            debug!("the request body cannot be sent again; not retrying");
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
        let replay = req.extensions().get::<Replay>();
        let body = match replay {
            Some(replay) => replay.body(),
            // Nothing to copy, and no extension to look for: most requests.
            None if req.body().is_end_stream() => empty(),
            None => return None,
        };
        let mut clone = Request::new(body);
        if let Some(replay) = replay {
            clone.extensions_mut().insert(replay.clone());
        }
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        self.replayable = true;
        Some(clone)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tower::{Service, ServiceExt};
    use tower_test::mock;

    use super::*;
    use crate::body;
    use crate::outbound::endpoint::ConnectError;

    /// A GET with a small body, recorded (and read whole, as a first
    /// attempt would before its answer).
    fn request() -> Request<ProxyBody> {
        let (body, replay) = body::record(body::full("x"));
        drop(body);
        let mut req = Request::new(body::empty());
        req.extensions_mut().insert(replay);
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

    fn broke_off() -> BoxError {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Box::new(EndpointError::Reset {
            addr,
            source: "connection closed".into(),
        })
    }

    fn not_forwarded() -> Response<ProxyBody> {
        Response::builder()
            .status(503)
            .header(NOT_FORWARDED_HEADER, "1")
            .body(empty())
            .unwrap()
    }

    /// Sends `method` through a retrying mock whose first answer is
    /// `first`; whether a second attempt came.
    async fn retried_after(method: Method, first: Result<Response<ProxyBody>, BoxError>) -> bool {
        let (svc, mut handle) = mock::pair::<Request<ProxyBody>, Response<ProxyBody>>();
        let mut svc = tower::retry::Retry::new(RetryPolicy::new(budget(), Counter::default()), svc);
        let mut req = request();
        *req.method_mut() = method;
        let answer = tokio::spawn(svc.ready().await.unwrap().call(req));
        let (_, send) = handle.next_request().await.unwrap();
        match first {
            Ok(rsp) => send.send_response(rsp),
            Err(err) => send.send_error(err),
        }
        let again = tokio::select! {
            next = handle.next_request() => {
                next.unwrap().1.send_response(status(200));
                true
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        let _ = answer.await;
        again
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_that_may_have_run_is_never_sent_twice() {
        assert!(!retried_after(Method::POST, Err(broke_off())).await);
        assert!(!retried_after(Method::PATCH, Err(broke_off())).await);
        assert!(
            !retried_after(Method::POST, Ok(status(503))).await,
            "the app's own 503"
        );
        // Certainly not processed: any method goes again.
        assert!(retried_after(Method::POST, Err(refused())).await);
        assert!(retried_after(Method::POST, Ok(not_forwarded())).await);
        // Idempotent methods go again after a break too.
        assert!(retried_after(Method::GET, Err(broke_off())).await);
        assert!(retried_after(Method::PUT, Ok(status(503))).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_still_being_sent_is_not_replayed() {
        let (svc, mut handle) = mock::pair::<Request<ProxyBody>, Response<ProxyBody>>();
        let mut svc = tower::retry::Retry::new(RetryPolicy::new(budget(), Counter::default()), svc);
        let stream = http_body_util::StreamBody::new(futures::stream::pending::<
            Result<http_body::Frame<bytes::Bytes>, BoxError>,
        >());
        let (body, replay) = body::record(body::boxed(stream));
        let mut req = Request::new(body);
        req.extensions_mut().insert(replay);
        let answer = tokio::spawn(svc.ready().await.unwrap().call(req));
        // The first attempt keeps the body (a send task still streaming it).
        let (held, send) = handle.next_request().await.unwrap();
        send.send_error(refused());
        assert!(answer.await.unwrap().is_err(), "not retried");
        drop(held);
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
