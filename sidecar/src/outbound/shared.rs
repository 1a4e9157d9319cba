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
//!
//! # Threads
//!
//! The mutex is where a single thread is assumed: with one worker thread
//! (`--threads 1`, the default on one CPU) it is never contended, but with
//! several, every request to a destination would take the same lock for
//! the balancer's whole pick. So [`Shared::sharded`] keeps one service per
//! worker thread, each behind its own lock, and a request uses the shard of
//! the thread that made it: workers do not wait on each other, as Envoy's
//! workers each keep their own load balancer. (linkerd2-proxy shares one
//! balancer through a queue and a worker task instead, the hand-off this
//! module avoids.) A request keeps the shard of the thread that called it,
//! so requests of two threads meet on one lock only when a task moved to
//! another thread while waiting, or when more threads call than there are
//! shards.
//!
//! Registering a waiting request is O(1): it keeps the slot of its waker
//! and replaces the waker in place when polled again, instead of scanning
//! every waiting waker under the lock.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use tower::Service;

/// Where a waiting request's waker is: its index in the list of one
/// generation (the list is emptied, and the generation moves on, at each
/// wake).
#[derive(Debug, Clone, Copy)]
struct Slot {
    generation: u64,
    index: usize,
}

#[derive(Default)]
struct Waiting {
    wakers: Vec<Waker>,
    generation: u64,
}

/// The requests waiting for the inner service to become ready.
#[derive(Default)]
struct WakeAll {
    waiting: Mutex<Waiting>,
}

impl WakeAll {
    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `waker` for the next wake; `slot` is where the same
    /// request registered before, if it did.
    fn add(&self, waker: &Waker, slot: &mut Option<Slot>) {
        let mut waiting = self.waiting();
        match *slot {
            Some(s) if s.generation == waiting.generation => {
                let stored = &mut waiting.wakers[s.index];
                if !stored.will_wake(waker) {
                    stored.clone_from(waker);
                }
            }
            _ => {
                *slot = Some(Slot {
                    generation: waiting.generation,
                    index: waiting.wakers.len(),
                });
                waiting.wakers.push(waker.clone());
            }
        }
    }
}

impl Wake for WakeAll {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let wakers = {
            let mut waiting = self.waiting();
            waiting.generation = waiting.generation.wrapping_add(1);
            std::mem::take(&mut waiting.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }
}

/// One copy of the service, with the waiters of its readiness.
struct Shard<S> {
    service: Mutex<S>,
    wake_all: Arc<WakeAll>,
    waker: Waker,
}

impl<S> Shard<S> {
    fn new(service: S) -> Self {
        let wake_all = Arc::new(WakeAll::default());
        let waker = Waker::from(wake_all.clone());
        Self {
            service: Mutex::new(service),
            wake_all,
            waker,
        }
    }
}

/// Numbers the threads that call a [`Shared`] service, in the order of
/// their first call: the runtime's workers get 0, 1, 2 …
static THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// This thread's number (see [`THREADS`]).
fn thread_number() -> usize {
    THREAD.with(|n| match n.get() {
        Some(n) => n,
        None => {
            let next = THREADS.fetch_add(1, Ordering::Relaxed);
            n.set(Some(next));
            next
        }
    })
}

/// A clonable handle to one service; see the module documentation.
pub struct Shared<S> {
    shards: Arc<[Shard<S>]>,
}

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Self {
            shards: self.shards.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Shared<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl<S> Shared<S> {
    /// Shares `service`.
    pub fn new(service: S) -> Self {
        Self::sharded(vec![service])
    }

    /// Shares `services`, copies of one service: each thread uses one of
    /// them (see the module). At least one is needed; an empty list panics.
    pub fn sharded(services: Vec<S>) -> Self {
        assert!(!services.is_empty(), "a shared service needs a shard");
        Self {
            shards: services.into_iter().map(Shard::new).collect(),
        }
    }

    /// The shard for a request made on this thread.
    fn shard(&self) -> usize {
        match self.shards.len() {
            1 => 0,
            n => thread_number() % n,
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
            shard: self.shard(),
            shared: self.clone(),
            state: State::Waiting {
                req: Some(req),
                slot: None,
            },
        }
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F, Req> {
        Waiting { req: Option<Req>, slot: Option<Slot> },
        // In place, not boxed: no allocation per request.
        Called { #[pin] fut: F },
    }
}

pin_project_lite::pin_project! {
    /// The response of a [`Shared`] service.
    pub struct ResponseFuture<S: Service<Req>, Req> {
        shared: Shared<S>,
        shard: usize,
        #[pin]
        state: State<S::Future, Req>,
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    /// Polls the inner service's readiness and, once ready, calls it with
    /// `req` while still holding the lock.
    fn poll_call(
        shard: &Shard<S>,
        req: &mut Option<Req>,
        slot: &mut Option<Slot>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<S::Future, S::Error>> {
        let mut service = shard.service.lock().unwrap_or_else(|p| p.into_inner());
        let mut shared_cx = Context::from_waker(&shard.waker);
        let ready = match service.poll_ready(&mut shared_cx) {
            Poll::Pending => {
                // Wait to be woken; then look again, in case readiness came
                // between the poll and the registration.
                shard.wake_all.add(cx.waker(), slot);
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
                StateProj::Waiting { req, slot } => {
                    let shard = &this.shared.shards[*this.shard];
                    match Self::poll_call(shard, req, slot, cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                        Poll::Ready(Ok(fut)) => fut,
                    }
                }
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

    /// A task waker that counts its wakes.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_request_polled_again_keeps_one_registration_with_its_latest_waker() {
        let (mock, mut handle) = tower_test::mock::pair::<u32, u32>();
        handle.allow(0);
        let mut shared = Shared::new(mock);
        let mut waiting = std::pin::pin!(shared.call(1));
        let (first, second) = (Arc::new(Counting::default()), Arc::new(Counting::default()));
        for _ in 0..100 {
            let waker = Waker::from(first.clone());
            assert!(
                waiting
                    .as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            );
        }
        // Moved to another task (a new waker): the stored one is replaced.
        let waker = Waker::from(second.clone());
        assert!(
            waiting
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        let shard = &shared.shards[0];
        assert_eq!(shard.wake_all.waiting().wakers.len(), 1);
        shard.waker.wake_by_ref();
        assert_eq!(first.0.load(Ordering::Relaxed), 0);
        assert_eq!(second.0.load(Ordering::Relaxed), 1);
        // Woken, it registers anew for the next wake.
        assert!(
            waiting
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        assert_eq!(shard.wake_all.waiting().wakers.len(), 1);
    }

    #[test]
    fn each_thread_uses_a_shard_of_its_own() {
        // Each shard answers with its own number.
        let shards = (0..4)
            .map(|n| tower::service_fn(move |()| async move { Ok::<_, ()>(n) }))
            .collect();
        let shared = Shared::sharded(shards);
        let used: Vec<(usize, usize)> = (0..4)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let shard = futures::executor::block_on(async {
                        shared.clone().oneshot(()).await.unwrap()
                    });
                    (thread_number(), shard)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let mut threads: Vec<usize> = used.iter().map(|(t, _)| *t).collect();
        threads.sort_unstable();
        threads.dedup();
        assert_eq!(threads.len(), 4, "threads share a number: {used:?}");
        for (thread, shard) in used {
            assert_eq!(shard, thread % 4);
        }
    }
}
