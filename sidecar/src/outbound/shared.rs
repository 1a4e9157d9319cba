//! One service shared by every request to a destination, without a task in
//! between.
//!
//! tower's `Buffer` shares a `&mut self` service (the balancer) by giving it
//! a worker task and a channel: every request crosses two task hand-offs.
//! [`Shared`] instead keeps the service behind a mutex and has each request
//! take it just long enough to run `poll_ready` and `call` together — the
//! pairing tower requires — then awaits the response outside the lock.
//!
//! The inner service registers one waker when it is not ready. Here that
//! waker is a [`WakeAll`], which wakes every request waiting for readiness,
//! so a request that waits is woken whichever request polled last.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use tower::Service;

/// The requests waiting for the inner service to become ready.
#[derive(Default)]
struct WakeAll {
    waiting: Mutex<Vec<Waker>>,
}

impl WakeAll {
    fn waiting(&self) -> MutexGuard<'_, Vec<Waker>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, waker: &Waker) {
        let mut waiting = self.waiting();
        if !waiting.iter().any(|w| w.will_wake(waker)) {
            waiting.push(waker.clone());
        }
    }
}

impl Wake for WakeAll {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let waiting = std::mem::take(&mut *self.waiting());
        for waker in waiting {
            waker.wake();
        }
    }
}

struct Inner<S> {
    service: Mutex<S>,
    wake_all: Arc<WakeAll>,
    waker: Waker,
}

/// A clonable handle to one service; see the module documentation.
pub struct Shared<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Shared<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl<S> Shared<S> {
    /// Shares `service`.
    pub fn new(service: S) -> Self {
        let wake_all = Arc::new(WakeAll::default());
        let waker = Waker::from(wake_all.clone());
        Self {
            inner: Arc::new(Inner {
                service: Mutex::new(service),
                wake_all,
                waker,
            }),
        }
    }
}

impl<S, Req> Service<Req> for Shared<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, Req>;

    /// Always ready: readiness is awaited inside the call, under the lock,
    /// so that it cannot be used up by another request in between. Bound
    /// the requests waiting there with a concurrency limit in front.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            shared: self.clone(),
            state: State::Waiting { req: Some(req) },
        }
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F, Req> {
        Waiting { req: Option<Req> },
        // In place, not boxed: no allocation per request.
        Called { #[pin] fut: F },
    }
}

pin_project_lite::pin_project! {
    /// The response of a [`Shared`] service.
    pub struct ResponseFuture<S: Service<Req>, Req> {
        shared: Shared<S>,
        #[pin]
        state: State<S::Future, Req>,
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    /// Polls the inner service's readiness and, once ready, calls it with
    /// `req` while still holding the lock.
    fn poll_call(
        shared: &Shared<S>,
        req: &mut Option<Req>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<S::Future, S::Error>> {
        let inner = &shared.inner;
        let mut service = inner.service.lock().unwrap_or_else(|p| p.into_inner());
        let mut shared_cx = Context::from_waker(&inner.waker);
        let ready = match service.poll_ready(&mut shared_cx) {
            Poll::Pending => {
                // Wait to be woken; then look again, in case readiness came
                // between the poll and the registration.
                inner.wake_all.add(cx.waker());
                service.poll_ready(&mut shared_cx)
            }
            ready => ready,
        };
        match ready {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Ready(Ok(())) => match req.take() {
                Some(req) => Poll::Ready(Ok(service.call(req))),
                None => unreachable!("a request is called once"),
            },
        }
    }
}

impl<S: Service<Req>, Req> Future for ResponseFuture<S, Req> {
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let fut = match this.state.as_mut().project() {
                StateProj::Called { fut } => return fut.poll(cx),
                StateProj::Waiting { req } => match Self::poll_call(this.shared, req, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Ready(Ok(fut)) => fut,
                },
            };
            this.state.set(State::Called { fut });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn requests_wait_for_readiness_and_all_are_woken() {
        let (mock, mut handle) = tower_test::mock::pair::<u32, u32>();
        handle.allow(0);
        let shared = Shared::new(mock);
        // Three requests wait while the service is not ready.
        let waiting: Vec<_> = (0..3)
            .map(|i| tokio::spawn(shared.clone().oneshot(i)))
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(waiting.iter().all(|w| !w.is_finished()));
        // Readiness for all three: each is sent, and each gets its answer.
        handle.allow(3);
        for _ in 0..3 {
            let (req, send) = handle.next_request().await.expect("a request");
            send.send_response(req * 10);
        }
        let mut answers = Vec::new();
        for w in waiting {
            answers.push(w.await.unwrap().unwrap());
        }
        answers.sort_unstable();
        assert_eq!(answers, vec![0, 10, 20]);
    }

    #[tokio::test]
    async fn the_response_is_awaited_outside_the_lock() {
        let (mock, mut handle) = tower_test::mock::pair::<u32, u32>();
        handle.allow(2);
        let shared = Shared::new(mock);
        let first = shared.clone().oneshot(1);
        let second = shared.clone().oneshot(2);
        let both = futures::future::join(first, second);
        let answer = async {
            let (a, send_a) = handle.next_request().await.unwrap();
            let (b, send_b) = handle.next_request().await.unwrap();
            // Both are in flight at once, answered in reverse order.
            send_b.send_response(b);
            send_a.send_response(a);
        };
        // Were the first response awaited under the lock, the second
        // request could not be sent and this would never finish.
        let ((a, b), ()) =
            tokio::time::timeout(Duration::from_secs(5), futures::future::join(both, answer))
                .await
                .expect("the second request waited for the first response");
        assert_eq!((a.unwrap(), b.unwrap()), (1, 2));
    }
}
