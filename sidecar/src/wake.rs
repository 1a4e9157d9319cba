//! Polling a future only after it was woken.
//!
//! A connection task waits on its connection and, beside it, on signals
//! that almost never fire: shutdown, an idle or keep-alive timer. A
//! `select!` polls every branch each time the task is woken, which is
//! several times per request, and each such poll costs: a cancellation
//! token's registers its waker under the token's lock, a timer's touches
//! its entry in tokio's wheel.
//!
//! [`OnWake`] gives its future a waker of its own and polls it only when
//! that waker was used since the last poll (and on the first poll, so the
//! future can register it). Otherwise a poll is one atomic swap, plus
//! keeping the task's waker current. It does the same for a stream, such as
//! the balancer's feed of discovery changes, polled on every request. The
//! trade-off: each wrapped future holds a waker of its own (one allocation
//! when it is made), and its wake-ups reach the task through one more
//! atomic step; worth it only for what is polled far more often than it
//! fires. What the skipped polls save per request is in the README's
//! sidecar benchmark table.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures::Stream;
use futures::task::AtomicWaker;

pin_project_lite::pin_project! {
    /// `fut` (a future or a stream), polled only after its own waker was
    /// woken; see the module.
    #[derive(Debug)]
    pub struct OnWake<F> {
        #[pin]
        fut: F,
        flag: Arc<Flag>,
        waker: Waker,
    }
}

/// Whether the inner future was woken, and the task to wake with it.
#[derive(Debug)]
struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> OnWake<F> {
    /// Wraps `fut`; its first poll goes through.
    pub fn new(fut: F) -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(flag.clone());
        Self { fut, flag, waker }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read: a wake in between still
        // reaches the task.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.fut.poll(&mut Context::from_waker(this.waker))
    }
}

/// As a stream: polled only after its waker was used, or after it yielded
/// an item (another may follow without a wake).
impl<S: Stream> Stream for OnWake<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.project();
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let next = this.fut.poll_next(&mut Context::from_waker(this.waker));
        if next.is_ready() {
            this.flag.woken.store(true, Ordering::Release);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;

    /// A future that counts its polls and is pending until its token is
    /// cancelled.
    struct Counted<'a> {
        polls: &'a AtomicUsize,
        cancelled: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    }

    impl Future for Counted<'_> {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.cancelled.as_mut().poll(cx)
        }
    }

    /// A task waker that counts its wakes.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_inner_future_is_polled_only_when_woken_and_its_wake_reaches_the_task() {
        let polls = AtomicUsize::new(0);
        let token = CancellationToken::new();
        let mut wrapped = std::pin::pin!(OnWake::new(Counted {
            polls: &polls,
            cancelled: Box::pin(token.clone().cancelled_owned()),
        }));
        let task = Arc::new(CountingWaker::default());
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..5 {
            assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled again unwoken");
        assert_eq!(task.0.load(Ordering::Relaxed), 0);

        token.cancel();
        assert_eq!(task.0.load(Ordering::Relaxed), 1, "the task was not woken");
        assert!(wrapped.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_stream_is_polled_after_an_item_and_after_a_wake_only() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let polls = AtomicUsize::new(0);
        let stream = futures::stream::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            rx.poll_recv(cx)
        });
        let mut wrapped = std::pin::pin!(OnWake::new(stream));
        let task = Arc::new(CountingWaker::default());
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        let mut next = || wrapped.as_mut().poll_next(&mut cx);

        assert!(next().is_pending());
        assert!(next().is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled again unwoken");

        // Two items sent: one wake, and both come out, the second without a
        // wake of its own.
        tx.send(1).expect("receiver alive");
        tx.send(2).expect("receiver alive");
        assert_eq!(task.0.load(Ordering::Relaxed), 1);
        assert_eq!(next(), Poll::Ready(Some(1)));
        assert_eq!(next(), Poll::Ready(Some(2)));
        assert!(next().is_pending());
        assert!(next().is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 4);

        drop(tx);
        assert_eq!(next(), Poll::Ready(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_inside_fires() {
        let started = tokio::time::Instant::now();
        let wrapped = OnWake::new(tokio::time::sleep(Duration::from_secs(30)));
        tokio::time::timeout(Duration::from_secs(60), wrapped)
            .await
            .expect("the task is woken when the timer fires");
        assert!(started.elapsed() >= Duration::from_secs(30));
    }
}
