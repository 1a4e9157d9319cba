//! Prometheus metrics of the DNS server.
//!
//! | metric | meaning |
//! |---|---|
//! | `signpost_dns_queries_total{type,rcode}` | queries answered, by query type and response code |
//! | `signpost_dns_response_duration_seconds` | time from a decoded query to its response being handed to the socket |
//! | `signpost_dns_snapshot_revision` | catalog revision the answers come from |
//! | `signpost_dns_snapshot_age_seconds` | age of that snapshot (grows while etcd is unreachable) |
//! | `signpost_dns_forwarded_total{result}` | forwarded queries by outcome |
//!
//! Label values come from small fixed sets (query types we serve plus
//! `other`), so a client cannot grow the series count.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Labels of `signpost_dns_queries_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    r#type: &'static str,
    rcode: &'static str,
}

/// Labels of `signpost_dns_forwarded_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForwardLabels {
    result: &'static str,
}

/// Outcome of a forwarded query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForwardResult {
    /// The upstream answered (NOERROR or NXDOMAIN, relayed).
    Answered,
    /// Every upstream answered with an error (SERVFAIL, REFUSED...) or
    /// could not be reached.
    Failed,
    /// No answer within the forward timeout.
    Timeout,
    /// Not sent: `--max-forwards` queries were already waiting upstream.
    Overloaded,
}

impl ForwardResult {
    fn label(self) -> &'static str {
        match self {
            ForwardResult::Answered => "answered",
            ForwardResult::Failed => "failed",
            ForwardResult::Timeout => "timeout",
            ForwardResult::Overloaded => "overloaded",
        }
    }
}

const TYPES: [&str; 10] = [
    "A", "AAAA", "SRV", "TXT", "PTR", "SOA", "NS", "ANY", "none", "other",
];
const RCODES: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other",
];

/// The slot of a query type, by its number on the wire.
fn type_slot(t: Option<u16>) -> usize {
    match t {
        Some(1) => 0,   // A
        Some(28) => 1,  // AAAA
        Some(33) => 2,  // SRV
        Some(16) => 3,  // TXT
        Some(12) => 4,  // PTR
        Some(6) => 5,   // SOA
        Some(2) => 6,   // NS
        Some(255) => 7, // ANY
        None => 8,
        Some(_) => 9,
    }
}

/// The slot of a response code, by its (extended) number.
fn rcode_slot(r: u16) -> usize {
    match r {
        0 => 0,  // NOERROR
        1 => 1,  // FORMERR
        2 => 2,  // SERVFAIL
        3 => 3,  // NXDOMAIN
        4 => 4,  // NOTIMP
        5 => 5,  // REFUSED
        16 => 6, // BADVERS
        _ => 7,
    }
}

/// Age of the snapshot, computed when scraped so it keeps growing while no
/// new snapshot arrives (which is exactly when it matters).
#[derive(Debug, Clone, Default)]
struct SnapshotAge {
    /// Build time of the current snapshot, milliseconds since the epoch
    /// (0: none yet).
    built_ms: Arc<AtomicU64>,
}

impl TypedMetric for SnapshotAge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for SnapshotAge {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let built = self.built_ms.load(Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let age = if built == 0 {
            0.0
        } else {
            now.saturating_sub(built) as f64 / 1000.0
        };
        encoder.encode_gauge(&age)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Query counts and response times as plain atomics, so that counting a
/// query costs a few uncontended atomic adds and never a lock (the
/// prometheus-client histogram takes a mutex per observation). Each UDP fast
/// path thread owns one (its cache lines stay on its core); the hickory path
/// (TCP, fallbacks) shares another.
#[derive(Debug)]
pub(crate) struct QueryStats {
    counts: [[AtomicU64; RCODES.len()]; TYPES.len()],
    /// Non-cumulative counts per bucket of [`BUCKET_BOUNDS_NS`], then +Inf.
    buckets: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
}

/// Number of finite histogram buckets: 10 µs to ~5 s, doubling. Cached
/// answers sit in the first buckets, forwarded ones further up to the
/// forward timeout.
const BUCKETS: usize = 20;
/// Upper bound of the first bucket.
const FIRST_BUCKET_NS: u64 = 10_000;

impl Default for QueryStats {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl QueryStats {
    /// Counts one query of type `qtype` (its number on the wire; `None`
    /// when there was not exactly one question) answered with `rcode`.
    pub(crate) fn query(&self, qtype: Option<u16>, rcode: u16, elapsed: Duration) {
        let (t, r) = (type_slot(qtype), rcode_slot(rcode));
        self.counts[t][r].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// The histogram bucket of a duration: the first whose bound is at least it.
fn bucket_of(ns: u64) -> usize {
    if ns <= FIRST_BUCKET_NS {
        return 0;
    }
    let q = (ns - 1) / FIRST_BUCKET_NS;
    let i = (u64::BITS - q.leading_zeros()) as usize;
    i.min(BUCKETS)
}

/// Every [`QueryStats`] of the server, summed when scraped.
#[derive(Debug, Clone, Default)]
struct StatsSet(Arc<Mutex<Vec<Arc<QueryStats>>>>);

impl StatsSet {
    fn with_all<T>(&self, f: impl FnOnce(&[Arc<QueryStats>]) -> T) -> T {
        match self.0.lock() {
            Ok(all) => f(&all),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    fn count(&self, t: usize, r: usize) -> u64 {
        self.with_all(|all| {
            all.iter()
                .map(|s| s.counts[t][r].load(Ordering::Relaxed))
                .sum()
        })
    }
}

/// `signpost_dns_queries_total`: a counter family over the type and rcode
/// slots.
#[derive(Debug, Clone)]
struct QueryCounts(StatsSet);

impl TypedMetric for QueryCounts {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for QueryCounts {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (t, r#type) in TYPES.iter().enumerate() {
            for (r, rcode) in RCODES.iter().enumerate() {
                let n = self.0.count(t, r);
                if n == 0 {
                    continue;
                }
                let labels = QueryLabels { r#type, rcode };
                encoder
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// `signpost_dns_response_duration_seconds`.
#[derive(Debug, Clone)]
struct ResponseDurations(StatsSet);

impl TypedMetric for ResponseDurations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ResponseDurations {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut buckets: Vec<(f64, u64)> = (0..=BUCKETS)
            .map(|i| {
                let bound = if i == BUCKETS {
                    f64::INFINITY
                } else {
                    (FIRST_BUCKET_NS << i) as f64 / 1e9
                };
                (bound, 0)
            })
            .collect();
        let mut sum_ns = 0u64;
        self.0.with_all(|all| {
            for s in all {
                for (b, n) in buckets.iter_mut().zip(&s.buckets) {
                    b.1 += n.load(Ordering::Relaxed);
                }
                sum_ns = sum_ns.wrapping_add(s.sum_ns.load(Ordering::Relaxed));
            }
        });
        let count = buckets.iter().map(|b| b.1).sum();
        encoder.encode_histogram::<NoLabelSet>(sum_ns as f64 / 1e9, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The DNS server's metrics. Cheap to share: every field is a handle.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    stats: StatsSet,
    /// The stats of the hickory path (TCP and UDP fallbacks).
    shared_stats: Arc<QueryStats>,
    revision: Gauge<i64, AtomicI64>,
    age: SnapshotAge,
    forwarded: Family<ForwardLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let shared_stats = Arc::new(QueryStats::default());
        Self {
            stats: StatsSet(Arc::new(Mutex::new(vec![shared_stats.clone()]))),
            shared_stats,
            revision: Gauge::default(),
            age: SnapshotAge::default(),
            forwarded: Family::default(),
        }
    }
}

impl Metrics {
    /// Adds the metrics to `registry`.
    pub(crate) fn register(&self, registry: &mut Registry) {
        // prometheus-client appends `_total` to counters.
        registry.register(
            "signpost_dns_queries",
            "DNS queries answered, by query type and response code",
            QueryCounts(self.stats.clone()),
        );
        registry.register(
            "signpost_dns_response_duration_seconds",
            "Time to produce a DNS response",
            ResponseDurations(self.stats.clone()),
        );
        registry.register(
            "signpost_dns_snapshot_revision",
            "Catalog revision the DNS answers come from",
            self.revision.clone(),
        );
        registry.register(
            "signpost_dns_snapshot_age_seconds",
            "Age of the catalog snapshot the DNS answers come from",
            self.age.clone(),
        );
        registry.register(
            "signpost_dns_forwarded",
            "Queries forwarded to upstream resolvers, by outcome",
            self.forwarded.clone(),
        );
    }

    /// New stats of their own for one receive thread, summed with the
    /// others when scraped.
    pub(crate) fn thread_stats(&self) -> Arc<QueryStats> {
        let stats = Arc::new(QueryStats::default());
        match self.stats.0.lock() {
            Ok(mut all) => all.push(stats.clone()),
            Err(poisoned) => poisoned.into_inner().push(stats.clone()),
        }
        stats
    }

    /// Counts one query answered on the hickory path and how long it took.
    pub(crate) fn query(&self, qtype: Option<RecordType>, rcode: ResponseCode, elapsed: Duration) {
        self.shared_stats
            .query(qtype.map(u16::from), u16::from(rcode), elapsed);
    }

    /// Counts one forwarded query.
    pub(crate) fn forwarded(&self, result: ForwardResult) {
        self.forwarded
            .get_or_create(&ForwardLabels {
                result: result.label(),
            })
            .inc();
    }

    /// Records the snapshot now answered from.
    pub(crate) fn snapshot(&self, revision: i64, built: SystemTime) {
        self.revision.set(revision);
        let ms = built
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.age.built_ms.store(ms, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn metrics_are_exposed_with_their_names() {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.query(
            Some(RecordType::A),
            ResponseCode::NoError,
            Duration::from_micros(30),
        );
        metrics.query(
            Some(RecordType::A),
            ResponseCode::NoError,
            Duration::from_micros(30),
        );
        metrics.query(
            Some(RecordType::CAA),
            ResponseCode::NXDomain,
            Duration::from_micros(30),
        );
        metrics.forwarded(ForwardResult::Timeout);
        metrics.snapshot(42, SystemTime::now() - Duration::from_secs(3));
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"signpost_dns_queries_total{type="A",rcode="NOERROR"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"signpost_dns_queries_total{type="other",rcode="NXDOMAIN"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("signpost_dns_response_duration_seconds_count 3"),
            "{text}"
        );
        assert!(text.contains("signpost_dns_snapshot_revision 42"), "{text}");
        assert!(
            text.contains(r#"signpost_dns_forwarded_total{result="timeout"} 1"#),
            "{text}"
        );
        let age_line = text
            .lines()
            .find(|l| l.starts_with("signpost_dns_snapshot_age_seconds "))
            .unwrap();
        let age: f64 = age_line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((2.5..60.0).contains(&age), "{age_line}");
    }

    #[test]
    fn thread_stats_are_summed_and_bucketed() {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let a = metrics.thread_stats();
        let b = metrics.thread_stats();
        a.query(Some(1), 0, Duration::from_micros(5));
        b.query(Some(1), 0, Duration::from_micros(15));
        b.query(Some(33), 3, Duration::from_micros(40));
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"signpost_dns_queries_total{type="A",rcode="NOERROR"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"signpost_dns_queries_total{type="SRV",rcode="NXDOMAIN"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"signpost_dns_response_duration_seconds_bucket{le="0.00001"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"signpost_dns_response_duration_seconds_bucket{le="0.00004"} 3"#),
            "{text}"
        );
        assert!(
            text.contains("signpost_dns_response_duration_seconds_count 3"),
            "{text}"
        );
    }

    #[test]
    fn buckets_are_upper_bounds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(10_000), 0);
        assert_eq!(bucket_of(10_001), 1);
        assert_eq!(bucket_of(20_000), 1);
        assert_eq!(bucket_of(20_001), 2);
        assert_eq!(bucket_of(40_000), 2);
        assert_eq!(bucket_of(u64::MAX), BUCKETS);
    }
}
