//! Open-loop load: unary calls at a fixed rate, with latency measured from
//! when each call was due.
//!
//! Call `i` is due at `start + i / rate`, whether or not earlier calls have
//! answered. A closed loop (send, wait, send) slows down with the server and
//! so never sees the queue it causes — coordinated omission. Here a call
//! that leaves late, because the client is saturated or all
//! [`Load::concurrency`] slots are busy, counts the wait in its latency.
//! A call may leave up to a timer tick (1 ms) early; it is then timed from
//! when it left.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::{EchoClient, EchoRequest};

/// The resolution of tokio's timer.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// A load to offer.
#[derive(Debug, Clone)]
pub struct Load {
    /// Calls a second.
    pub rate: f64,
    /// How long to offer them; `rate * duration` calls in all.
    pub duration: Duration,
    /// Calls in flight at most. A call due while all are busy waits for a
    /// slot, and the wait counts in its latency.
    pub concurrency: usize,
    /// Each call's deadline, sent as `grpc-timeout`.
    pub timeout: Duration,
    /// The request every call sends.
    pub request: EchoRequest,
}

/// What a [`run`] measured.
#[derive(Debug, Default)]
pub struct Report {
    /// Calls sent and answered, successfully or not.
    pub calls: u64,
    /// Of those, the ones that failed.
    pub errors: u64,
    /// Calls never sent: still waiting for a slot when the duration ran
    /// out.
    pub unsent: u64,
    /// Latency of each successful call, from when it was due, sorted. Errors
    /// are counted, not timed: a fast refusal would flatter the percentiles.
    pub latencies: Vec<Duration>,
    /// The first failure, to say why calls failed.
    pub first_error: Option<Status>,
    /// From the first call due to the last answer.
    pub elapsed: Duration,
}

impl Report {
    /// The `p`-th quantile (`0.0..=1.0`) of [`Report::latencies`], by
    /// nearest rank; `None` without a successful call.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let n = self.latencies.len();
        if n == 0 {
            return None;
        }
        let rank = (p.clamp(0.0, 1.0) * n as f64).ceil() as usize;
        Some(self.latencies[rank.clamp(1, n) - 1])
    }

    /// Counts one finished call.
    fn record(&mut self, done: Result<(Duration, Result<(), Status>), tokio::task::JoinError>) {
        self.calls += 1;
        match done {
            Ok((latency, Ok(()))) => self.latencies.push(latency),
            Ok((_, Err(status))) => {
                self.errors += 1;
                self.first_error.get_or_insert(status);
            }
            Err(panicked) => {
                self.errors += 1;
                self.first_error
                    .get_or_insert(Status::internal(format!("call task failed: {panicked}")));
            }
        }
    }
}

/// One line: `calls=… errors=… p50_ms=… p90_ms=… p99_ms=… max_ms=…
/// unsent=… elapsed_s=…`; percentiles are `-` without a successful call.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "calls={} errors={}", self.calls, self.errors)?;
        for (name, p) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("max", 1.0)] {
            match self.percentile(p) {
                Some(latency) => write!(f, " {name}_ms={:.3}", latency.as_secs_f64() * 1e3)?,
                None => write!(f, " {name}_ms=-")?,
            }
        }
        write!(
            f,
            " unsent={} elapsed_s={:.3}",
            self.unsent,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Offers `load` on `client`'s channel (one HTTP/2 connection, calls
/// multiplexed) and waits for every call sent to end.
pub async fn run(client: EchoClient<Channel>, load: &Load) -> Report {
    let rate = if load.rate.is_finite() && load.rate > 0.0 {
        load.rate
    } else {
        0.0
    };
    let total = (rate * load.duration.as_secs_f64()).round() as u64;
    let slots = Arc::new(Semaphore::new(load.concurrency.max(1)));
    let start = Instant::now();
    let end = start + load.duration;
    let mut report = Report::default();
    let mut calls = JoinSet::new();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        // tokio's timer fires on the first millisecond tick at or after its
        // deadline: sleeping until `due` would send every call up to 1 ms
        // late, and that lateness would read as latency. So wake a tick
        // early, and time each call from when it was due or when it was
        // sent, whichever came first: the client's own lateness still
        // counts, its earliness does not flatter.
        tokio::time::sleep_until(due.checked_sub(TIMER_TICK).unwrap_or(due)).await;
        // A free slot wins over the end having passed: a client running
        // late still sends what it can get a slot for.
        let slot = tokio::select! {
            biased;
            slot = slots.clone().acquire_owned() => slot.ok(),
            () = tokio::time::sleep_until(end) => None,
        };
        let Some(slot) = slot else {
            report.unsent = total - i;
            break;
        };
        let mut client = client.clone();
        let mut request = Request::new(load.request.clone());
        request.set_timeout(load.timeout);
        calls.spawn(async move {
            let from = due.min(Instant::now());
            let answer = client.unary(request).await;
            drop(slot);
            (from.elapsed(), answer.map(drop))
        });
        // Collect as we go, so finished calls do not pile up in the set.
        while let Some(done) = calls.try_join_next() {
            report.record(done);
        }
    }
    while let Some(done) = calls.join_next().await {
        report.record(done);
    }
    report.elapsed = start.elapsed();
    report.latencies.sort_unstable();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(millis: impl IntoIterator<Item = u64>) -> Report {
        let mut latencies: Vec<_> = millis.into_iter().map(Duration::from_millis).collect();
        latencies.sort_unstable();
        Report {
            calls: latencies.len() as u64,
            latencies,
            ..Report::default()
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let r = report(1..=100);
        assert_eq!(r.percentile(0.50), Some(Duration::from_millis(50)));
        assert_eq!(r.percentile(0.90), Some(Duration::from_millis(90)));
        assert_eq!(r.percentile(0.99), Some(Duration::from_millis(99)));
        assert_eq!(r.percentile(1.0), Some(Duration::from_millis(100)));
        assert_eq!(r.percentile(0.0), Some(Duration::from_millis(1)));
        let one = report([7]);
        assert_eq!(one.percentile(0.5), Some(Duration::from_millis(7)));
        assert_eq!(report([]).percentile(0.5), None);
    }

    #[test]
    fn report_is_one_line_of_key_values() {
        let mut r = report([1, 2, 3, 4]);
        r.errors = 1;
        r.calls = 5;
        r.elapsed = Duration::from_millis(1500);
        assert_eq!(
            r.to_string(),
            "calls=5 errors=1 p50_ms=2.000 p90_ms=4.000 p99_ms=4.000 max_ms=4.000 unsent=0 elapsed_s=1.500"
        );
        assert_eq!(
            report([]).to_string(),
            "calls=0 errors=0 p50_ms=- p90_ms=- p99_ms=- max_ms=- unsent=0 elapsed_s=0.000"
        );
    }
}
