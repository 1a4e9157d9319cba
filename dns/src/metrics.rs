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
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
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
    /// The upstream answered (any response code it chose, relayed).
    Answered,
    /// The upstream answered with an error, or could not be reached.
    Failed,
    /// No answer within the forward timeout.
    Timeout,
}

impl ForwardResult {
    fn label(self) -> &'static str {
        match self {
            ForwardResult::Answered => "answered",
            ForwardResult::Failed => "failed",
            ForwardResult::Timeout => "timeout",
        }
    }
}

const TYPES: [&str; 10] = [
    "A", "AAAA", "SRV", "TXT", "PTR", "SOA", "NS", "ANY", "none", "other",
];
const RCODES: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other",
];

fn type_slot(t: Option<RecordType>) -> usize {
    match t {
        Some(RecordType::A) => 0,
        Some(RecordType::AAAA) => 1,
        Some(RecordType::SRV) => 2,
        Some(RecordType::TXT) => 3,
        Some(RecordType::PTR) => 4,
        Some(RecordType::SOA) => 5,
        Some(RecordType::NS) => 6,
        Some(RecordType::ANY) => 7,
        None => 8,
        Some(_) => 9,
    }
}

fn rcode_slot(r: ResponseCode) -> usize {
    match r {
        ResponseCode::NoError => 0,
        ResponseCode::FormErr => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::NXDomain => 3,
        ResponseCode::NotImp => 4,
        ResponseCode::Refused => 5,
        ResponseCode::BADVERS => 6,
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

/// The DNS server's metrics. Cheap to share: every field is a handle.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    queries: Family<QueryLabels, Counter>,
    /// The counters of `queries`, resolved once per label pair so that a
    /// query does not take the family's lock to count itself.
    query_cells: Arc<[[OnceLock<Counter>; RCODES.len()]; TYPES.len()]>,
    duration: Histogram,
    revision: Gauge<i64, AtomicI64>,
    age: SnapshotAge,
    forwarded: Family<ForwardLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            queries: Family::default(),
            query_cells: Arc::new(std::array::from_fn(|_| {
                std::array::from_fn(|_| OnceLock::new())
            })),
            // 10 µs to ~5 s: cached answers sit in the first buckets,
            // forwarded ones further up to the forward timeout.
            duration: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
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
            self.queries.clone(),
        );
        registry.register(
            "signpost_dns_response_duration_seconds",
            "Time to produce a DNS response",
            self.duration.clone(),
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

    /// Counts one answered query and how long it took.
    pub(crate) fn query(&self, qtype: Option<RecordType>, rcode: ResponseCode, elapsed: Duration) {
        let (t, r) = (type_slot(qtype), rcode_slot(rcode));
        self.query_cells[t][r]
            .get_or_init(|| {
                self.queries
                    .get_or_create(&QueryLabels {
                        r#type: TYPES[t],
                        rcode: RCODES[r],
                    })
                    .clone()
            })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
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
}
