//! Request timeouts on reused timers.
//!
//! `tokio::time::timeout` makes a timer per request: it goes into tokio's
//! timer wheel (under the driver's lock) on its first wait and comes out
//! again (the lock again) when the request ends, first or not.
//!
//! A [`Timers`] pool keeps the timers of finished requests, still in the
//! wheel. The next request moves one to its own deadline, which is later:
//! tokio then only updates the entry's expiry (an atomic store), and puts
//! it back in its slot once, when the old expiry comes round. A request
//! that is answered before it ever waits takes no timer at all. The
//! trade-off: up to [`MAX_IDLE`] finished timers stay allocated and in the
//! wheel, and taking or returning one goes through the pool's own lock,
//! which is held for a push or a pop only. What this saves per request is
//! in the README's sidecar benchmark table.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Timers kept at most: about the requests in flight at a busy moment.
const MAX_IDLE: usize = 1024;

/// A pool of reusable timers; one per listener.
#[derive(Debug, Default)]
pub struct Timers {
    idle: Mutex<Vec<Pin<Box<Sleep>>>>,
}

/// The request ran past its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline elapsed")]
pub struct Elapsed;

impl Timers {
    /// An empty pool.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// `fut`, failing with [`Elapsed`] once `after` has passed.
    pub fn timeout<F: Future>(self: &Arc<Self>, after: Duration, fut: F) -> Timeout<F> {
        Timeout {
            fut,
            deadline: Instant::now() + after,
            timer: Lease {
                sleep: None,
                pool: self.clone(),
            },
        }
    }

    /// A timer set to `deadline`: a kept one when there is one.
    fn take(&self, deadline: Instant) -> Pin<Box<Sleep>> {
        let kept = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match kept {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    fn put(&self, sleep: Pin<Box<Sleep>>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sleep);
        }
    }

    /// Timers kept now.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }
}

/// The timer a [`Timeout`] holds, back to its pool when dropped.
#[derive(Debug)]
struct Lease {
    sleep: Option<Pin<Box<Sleep>>>,
    pool: Arc<Timers>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            self.pool.put(sleep);
        }
    }
}

pin_project_lite::pin_project! {
    /// A future with a deadline; see [`Timers::timeout`].
    #[derive(Debug)]
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        deadline: Instant,
        timer: Lease,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let pool = &this.timer.pool;
        let deadline = *this.deadline;
        let sleep = this.timer.sleep.get_or_insert_with(|| pool.take(deadline));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// How long a request may wait for its response headers, and from when.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// The limit.
    pub after: Duration,
    /// A gRPC deadline counts from the call's start; the request timeout
    /// from the end of the request body.
    pub from_start: bool,
}

/// The deadline of a request with `grpc_timeout` (see
/// [`crate::headers::Head`]): that when smaller than `request_timeout`,
/// which is the limit otherwise.
pub fn deadline_of(grpc_timeout: Option<Duration>, request_timeout: Duration) -> Deadline {
    match grpc_timeout {
        Some(grpc) if grpc < request_timeout => Deadline {
            after: grpc,
            from_start: true,
        },
        _ => Deadline {
            after: request_timeout,
            from_start: false,
        },
    }
}

/// The `grpc-timeout` header.
pub const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// A `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`,
/// `m`, `u`, `n`), as the gRPC HTTP/2 protocol defines it.
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

impl Timers {
    /// `call` under `deadline`: counted from now for a gRPC deadline,
    /// otherwise from the end of the request body (`ended`; from now for a
    /// request without a body).
    pub async fn timed<F: Future + Unpin>(
        self: &Arc<Self>,
        mut call: F,
        ended: Option<crate::body::BodyEnd>,
        deadline: Deadline,
    ) -> Result<F::Output, Elapsed> {
        if let Some(ended) = ended
            && !deadline.from_start
        {
            tokio::select! {
                biased;
                rsp = &mut call => return Ok(rsp),
                () = ended => {}
            }
        }
        self.timeout(deadline.after, call).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that a future that never ends fails after exactly `after`.
    async fn times_out_after(timers: &Arc<Timers>, after: Duration) {
        let started = Instant::now();
        let out = timers.timeout(after, std::future::pending::<()>()).await;
        assert_eq!(out, Err(Elapsed));
        assert_eq!(started.elapsed(), after);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_future_times_out_at_its_deadline() {
        times_out_after(&Timers::new(), Duration::from_secs(30)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_future_passes_and_its_timer_is_kept() {
        let timers = Timers::new();
        let out = timers
            .timeout(Duration::from_secs(30), async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                7
            })
            .await;
        assert_eq!(out, Ok(7));
        assert_eq!(timers.idle(), 1, "the timer it waited on is kept");
        // Ready at once: no timer taken.
        assert_eq!(
            timers.timeout(Duration::from_secs(1), async { 8 }).await,
            Ok(8)
        );
        assert_eq!(timers.idle(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_keeps_the_new_deadline_not_the_old() {
        let timers = Timers::new();
        // A timer set for 1 s, kept after its request ended early.
        let quick = timers.timeout(Duration::from_secs(1), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
        });
        assert!(quick.await.is_ok());
        // Reused for a 30 s deadline: the old 1 s expiry must not fire it.
        times_out_after(&timers, Duration::from_secs(30)).await;
        assert_eq!(timers.idle(), 1, "one timer, reused");
        // And one whose kept timer already fired in the pool still waits.
        tokio::time::sleep(Duration::from_secs(60)).await;
        times_out_after(&timers, Duration::from_secs(2)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_timeouts_each_keep_their_own_deadline() {
        let timers = Timers::new();
        let short = timers.timeout(Duration::from_secs(1), std::future::pending::<()>());
        let long = timers.timeout(Duration::from_secs(3), async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            "done"
        });
        let (short, long) = tokio::join!(short, long);
        assert_eq!(short, Err(Elapsed));
        assert_eq!(long, Ok("done"));
        assert_eq!(timers.idle(), 2);
    }

    #[test]
    fn grpc_timeouts_are_read_as_the_protocol_defines_them() {
        assert_eq!(
            parse_grpc_timeout(b"100m"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"5u"), Some(Duration::from_micros(5)));
        for bad in [&b""[..], b"m", b"123456789m", b"10x", b"-1S", b"1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        let grpc = Some(Duration::from_millis(250));
        let d = deadline_of(grpc, Duration::from_secs(30));
        assert_eq!(d.after, Duration::from_millis(250));
        assert!(d.from_start);
        let d = deadline_of(grpc, Duration::from_millis(100));
        assert_eq!(d.after, Duration::from_millis(100), "the smaller one");
        assert!(!d.from_start);
    }
}
