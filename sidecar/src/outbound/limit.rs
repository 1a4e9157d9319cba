//! The cap on a destination's pending requests: past it, a request is
//! refused at once (503) instead of queueing behind a slow service.
//!
//! This is what tower's `LoadShed` over `ConcurrencyLimit` does, with one
//! shared counter instead of a semaphore permit and two nested futures per
//! request. The services below it (retries over the shared balancer) are
//! always ready, so the only wait is for an endpoint, and the count covers
//! every request from its call to its response.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::BoxError;

/// The refusal of a request past the limit.
#[derive(Debug, thiserror::Error)]
#[error("{limit} requests already pending")]
pub struct Overloaded {
    /// The limit.
    pub limit: usize,
}

/// Makes [`PendingLimit`]s of one limit.
#[derive(Debug, Clone, Copy)]
pub struct PendingLimitLayer {
    limit: usize,
}

impl PendingLimitLayer {
    /// At most `limit` requests pending (at least one).
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
        }
    }
}

impl<S> Layer<S> for PendingLimitLayer {
    type Service = PendingLimit<S>;

    fn layer(&self, inner: S) -> PendingLimit<S> {
        PendingLimit {
            inner,
            pending: Arc::default(),
            limit: self.limit,
        }
    }
}

/// Refuses requests while `limit` are pending; clones share the count.
#[derive(Debug, Clone)]
pub struct PendingLimit<S> {
    inner: S,
    pending: Arc<AtomicUsize>,
    limit: usize,
}

impl<S> PendingLimit<S> {
    /// Requests pending now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

impl<S, Req> Service<Req> for PendingLimit<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return ResponseFuture::Refused { limit: self.limit };
        }
        ResponseFuture::Admitted {
            inner: self.inner.call(req),
            guard: Guard(self.pending.clone()),
        }
    }
}

/// Counts one pending request until dropped.
#[derive(Debug)]
struct Guard(Arc<AtomicUsize>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project! {
    /// The response of a [`PendingLimit`]. (The macro takes no documentation
    /// on variant fields: `inner` is the inner response, `guard` keeps the
    /// request counted, `limit` is the limit that refused it.)
    #[project = Projected]
    #[allow(missing_docs)]
    pub enum ResponseFuture<F> {
        /// Admitted: the inner response, counted until it is dropped.
        Admitted {
            #[pin]
            inner: F,
            guard: Guard,
        },
        /// Refused: the limit was reached.
        Refused { limit: usize },
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Admitted { inner, .. } => inner.poll(cx).map_err(Into::into),
            Projected::Refused { limit } => Poll::Ready(Err(Overloaded { limit: *limit }.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn past_the_limit_requests_are_refused_at_once_and_admitted_again_after() {
        let (mock, mut handle) = tower_test::mock::pair::<u32, u32>();
        handle.allow(10);
        let limited = PendingLimitLayer::new(2).layer(mock);
        let first = limited.clone().oneshot(1);
        let second = limited.clone().oneshot(2);
        let (first, second) = (tokio::spawn(first), tokio::spawn(second));
        let (r1, send1) = handle.next_request().await.unwrap();
        let (r2, send2) = handle.next_request().await.unwrap();
        assert_eq!(limited.pending(), 2);

        let err = limited.clone().oneshot(3).await.unwrap_err();
        assert!(err.is::<Overloaded>(), "{err}");
        assert_eq!(limited.pending(), 2, "a refusal is not counted");

        send1.send_response(r1);
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(limited.pending(), 1);
        let third = tokio::spawn(limited.clone().oneshot(4));
        let (r4, send4) = handle.next_request().await.unwrap();
        send4.send_response(r4);
        assert_eq!(third.await.unwrap().unwrap(), 4);
        send2.send_response(r2);
        assert_eq!(second.await.unwrap().unwrap(), 2);
        assert_eq!(limited.pending(), 0);
    }

    #[tokio::test]
    async fn a_dropped_request_leaves_the_count() {
        let (mock, mut handle) = tower_test::mock::pair::<u32, u32>();
        handle.allow(1);
        let mut limited = PendingLimitLayer::new(1).layer(mock);
        let fut = limited.ready().await.unwrap().call(1);
        assert_eq!(limited.pending(), 1);
        drop(fut);
        assert_eq!(limited.pending(), 0);
    }
}
