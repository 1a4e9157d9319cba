//! The sidecar's Prometheus metrics, served on the admin port.
//!
//! Names are stable and carry their unit; labels are bounded (directions,
//! service names, status codes, handshake failure reasons), never peer
//! addresses or paths.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};

use crate::body::{BoxError, ProxyBody};
use crate::error::GRPC_STATUS;

/// Which way a request went through the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the local app to a peer.
    Outbound,
    /// From a peer to the local app.
    Inbound,
}

impl Direction {
    /// The label value: `outbound` or `inbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Labels of `signpost_sidecar_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Outbound or inbound.
    pub direction: Direction,
    /// The destination service (outbound) or this service (inbound).
    pub service: String,
    /// The HTTP status answered.
    pub status: u16,
}

/// Labels of `signpost_sidecar_grpc_responses_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GrpcLabels {
    /// Outbound or inbound.
    pub direction: Direction,
    /// The destination service (outbound) or this service (inbound).
    pub service: String,
    /// The `grpc-status` code (`0` OK, `14` UNAVAILABLE, ...), `missing`
    /// when the call ended without one.
    pub grpc_status: String,
}

/// Labels of the duration histogram.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DurationLabels {
    /// Outbound or inbound.
    pub direction: Direction,
    /// The destination service (outbound) or this service (inbound).
    pub service: String,
}

/// Labels carrying only a service name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    /// The destination service.
    pub service: String,
}

/// Labels of `signpost_sidecar_tls_handshake_failures_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// Why it failed (`unknown_ca`, `expired`, `wrong_identity`, ...).
    pub reason: String,
}

fn duration_histogram() -> Histogram {
    // 1 ms to ~16 s: covers an in-memory answer to a slow backend.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric the sidecar keeps; cheap to clone (all handles are shared).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Requests answered, by direction, service and status.
    pub requests: Family<RequestLabels, Counter>,
    /// gRPC calls answered, by direction, service and `grpc-status`: the
    /// HTTP status of a gRPC call is 200 whatever happened.
    pub grpc_responses: Family<GrpcLabels, Counter>,
    /// Request durations, by direction and service.
    pub durations: Family<DurationLabels, Histogram, fn() -> Histogram>,
    /// Failed TLS handshakes, by reason.
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    /// Endpoints known per destination.
    pub endpoints: Family<ServiceLabels, Gauge>,
    /// Outlier ejections, by destination.
    pub ejections: Family<ServiceLabels, Counter>,
    /// Retries sent, by destination.
    pub retries: Family<ServiceLabels, Counter>,
    /// Unix time at which the workload certificate expires (0 before the
    /// first one): alert on `signpost_sidecar_certificate_expiry_seconds - time()`.
    pub certificate_expiry: Gauge,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the metrics and their registry.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let grpc_responses = Family::<GrpcLabels, Counter>::default();
        let durations =
            Family::<DurationLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        let handshake_failures = Family::<HandshakeLabels, Counter>::default();
        let endpoints = Family::<ServiceLabels, Gauge>::default();
        let ejections = Family::<ServiceLabels, Counter>::default();
        let retries = Family::<ServiceLabels, Counter>::default();
        let certificate_expiry = Gauge::default();
        registry.register(
            "signpost_sidecar_requests",
            "Requests answered by the sidecar",
            requests.clone(),
        );
        registry.register(
            "signpost_sidecar_grpc_responses",
            "gRPC calls answered, by grpc-status (from the trailers, or the headers of a trailers-only answer)",
            grpc_responses.clone(),
        );
        registry.register(
            "signpost_sidecar_request_duration_seconds",
            "Time from a request's arrival to its response headers",
            durations.clone(),
        );
        registry.register(
            "signpost_sidecar_tls_handshake_failures",
            "Failed mesh TLS handshakes, by reason",
            handshake_failures.clone(),
        );
        registry.register(
            "signpost_sidecar_endpoints",
            "Endpoints of a destination service, as last resolved",
            endpoints.clone(),
        );
        registry.register(
            "signpost_sidecar_ejections",
            "Endpoints ejected for consecutive failures",
            ejections.clone(),
        );
        registry.register(
            "signpost_sidecar_retries",
            "Requests retried on another endpoint",
            retries.clone(),
        );
        registry.register(
            "signpost_sidecar_certificate_expiry_seconds",
            "Unix time at which the workload certificate expires",
            certificate_expiry.clone(),
        );
        Self {
            requests,
            grpc_responses,
            durations,
            handshake_failures,
            endpoints,
            ejections,
            retries,
            certificate_expiry,
            registry: Arc::new(registry),
        }
    }

    /// The request metrics of one direction and service, looked up once
    /// and held by whoever counts its requests.
    pub fn requests_of(&self, direction: Direction, service: &str) -> RequestMetrics {
        let duration = self
            .durations
            .get_or_create(&DurationLabels {
                direction,
                service: service.to_string(),
            })
            .clone();
        RequestMetrics(Arc::new(RequestMetricsInner {
            direction,
            service: service.to_string(),
            requests: self.requests.clone(),
            grpc: self.grpc_responses.clone(),
            by_status: Mutex::default(),
            duration,
        }))
    }

    /// Counts a failed handshake.
    pub fn handshake_failure(&self, reason: &str) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Records the current certificate's expiry.
    pub fn set_certificate_expiry(&self, expires: SystemTime) {
        let secs = expires
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.certificate_expiry.set(secs);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The request counters and duration histogram of one direction and
/// service. Counting a request through it builds no labels and looks up no
/// map: the counters of the statuses seen so far (a handful) are kept at
/// hand.
#[derive(Debug, Clone)]
pub struct RequestMetrics(Arc<RequestMetricsInner>);

#[derive(Debug)]
struct RequestMetricsInner {
    direction: Direction,
    service: String,
    requests: Family<RequestLabels, Counter>,
    grpc: Family<GrpcLabels, Counter>,
    /// At most one entry per status code.
    by_status: Mutex<Vec<(u16, Counter)>>,
    duration: Histogram,
}

impl RequestMetrics {
    /// Counts one answered request.
    pub fn record(&self, status: u16, took: Duration) {
        let inner = &*self.0;
        let counter = {
            let mut by_status = inner.by_status.lock().unwrap_or_else(|p| p.into_inner());
            match by_status.iter().find(|(s, _)| *s == status) {
                Some((_, counter)) => counter.clone(),
                None => {
                    let counter = inner
                        .requests
                        .get_or_create(&RequestLabels {
                            direction: inner.direction,
                            service: inner.service.clone(),
                            status,
                        })
                        .clone();
                    by_status.push((status, counter.clone()));
                    counter
                }
            }
        };
        counter.inc();
        inner.duration.observe(took.as_secs_f64());
    }

    /// Counts one gRPC call that ended with `grpc_status` (its value, as
    /// sent; anything but a number is counted as `invalid`).
    pub fn record_grpc(&self, grpc_status: Option<&[u8]>) {
        let label = match grpc_status {
            None => "missing".to_string(),
            Some(code)
                if !code.is_empty() && code.len() <= 3 && code.iter().all(u8::is_ascii_digit) =>
            {
                String::from_utf8_lossy(code).into_owned()
            }
            Some(_) => "invalid".to_string(),
        };
        let inner = &*self.0;
        inner
            .grpc
            .get_or_create(&GrpcLabels {
                direction: inner.direction,
                service: inner.service.clone(),
                grpc_status: label,
            })
            .inc();
    }

    /// Counts the `grpc-status` of `rsp`, the answer to a gRPC call: at
    /// once for a trailers-only answer, else when its trailers pass.
    pub fn observe_grpc(&self, rsp: Response<ProxyBody>) -> Response<ProxyBody> {
        if let Some(code) = rsp.headers().get(GRPC_STATUS) {
            self.record_grpc(Some(code.as_bytes()));
            return rsp;
        }
        let metrics = self.clone();
        rsp.map(|body| {
            crate::body::boxed(GrpcObserved {
                body,
                metrics: Some(metrics),
            })
        })
    }
}

/// A gRPC response body that counts the `grpc-status` of its trailers.
struct GrpcObserved {
    body: ProxyBody,
    /// Taken when counted: each call once.
    metrics: Option<RequestMetrics>,
}

impl Body for GrpcObserved {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref()
                    && let Some(metrics) = self.metrics.take()
                {
                    metrics.record_grpc(trailers.get(GRPC_STATUS).map(|v| v.as_bytes()));
                }
            }
            None => {
                if let Some(metrics) = self.metrics.take() {
                    metrics.record_grpc(None);
                }
            }
            Some(Err(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_units() {
        let m = Metrics::new();
        m.requests_of(Direction::Outbound, "user")
            .record(200, Duration::from_millis(3));
        m.handshake_failure("unknown_ca");
        m.requests_of(Direction::Outbound, "user")
            .record_grpc(Some(b"14"));
        m.retries
            .get_or_create(&ServiceLabels {
                service: "user".into(),
            })
            .inc();
        let text = m.encode();
        for name in [
            "signpost_sidecar_requests_total{direction=\"outbound\",service=\"user\",status=\"200\"} 1",
            "signpost_sidecar_request_duration_seconds_bucket",
            "signpost_sidecar_tls_handshake_failures_total{reason=\"unknown_ca\"} 1",
            "signpost_sidecar_retries_total{service=\"user\"} 1",
            "signpost_sidecar_grpc_responses_total{direction=\"outbound\",service=\"user\",grpc_status=\"14\"} 1",
            "signpost_sidecar_certificate_expiry_seconds 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn handles_of_one_service_count_into_the_same_series() {
        let m = Metrics::new();
        let held = m.requests_of(Direction::Inbound, "user");
        held.record(200, Duration::from_millis(1));
        held.record(200, Duration::from_millis(1));
        held.record(503, Duration::from_millis(1));
        // A destination dropped when idle and made again gets a new handle.
        m.requests_of(Direction::Inbound, "user")
            .record(200, Duration::from_millis(1));
        let text = m.encode();
        for line in [
            "signpost_sidecar_requests_total{direction=\"inbound\",service=\"user\",status=\"200\"} 3",
            "signpost_sidecar_requests_total{direction=\"inbound\",service=\"user\",status=\"503\"} 1",
            "signpost_sidecar_request_duration_seconds_count{direction=\"inbound\",service=\"user\"} 4",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
