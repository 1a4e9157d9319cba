//! The outbound proxy, balancer and inbound side together over plain HTTP/2
//! on loopback (mesh TLS is covered in `mtls.rs`).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use signpost_control_plane::model::{MtlsMode, ServiceConfig, ServiceName};
use signpost_sidecar::config::AppProtocol;
use signpost_sidecar::discovery::{Endpoint, StaticResolver};
use signpost_sidecar::inbound::{Inbound, InboundConfig};
use signpost_sidecar::metrics::Metrics;
use signpost_sidecar::outbound::endpoint::{Connect, TcpConnect};
use signpost_sidecar::outbound::proxy::{Egress, OutboundConfig, OutboundProxy};
use signpost_sidecar::outbound::{DestinationConfig, Destinations, MakeConnect};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

/// Starts a plain inbound for `service` on `ip` in front of `app`.
async fn inbound(ip: &str, service: &str, app: SocketAddr, mode: MtlsMode) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let policy = Arc::new(ArcSwap::from_pointee(ServiceConfig {
        allow: vec![],
        mtls: mode,
    }));
    let inbound = Inbound::new(
        InboundConfig {
            service: name(service),
            id: format!("{service}-1"),
            app,
            request_timeout: Duration::from_secs(5),
            app_protocol: AppProtocol::Auto,
        },
        policy,
        None,
        Metrics::new(),
    );
    tokio::spawn(inbound.serve(listener, CancellationToken::new(), Duration::from_secs(1)));
    addr
}

struct Outbound {
    addr: SocketAddr,
    metrics: Metrics,
}

async fn outbound(resolver: &StaticResolver, request_timeout: Duration) -> Outbound {
    outbound_with(resolver, request_timeout, DestinationConfig::default()).await
}

async fn outbound_with(
    resolver: &StaticResolver,
    request_timeout: Duration,
    destination: DestinationConfig,
) -> Outbound {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Metrics::new();
    let make: MakeConnect = Arc::new(|_: &ServiceName, _| Arc::new(TcpConnect) as Arc<dyn Connect>);
    let destinations = Destinations::new(
        Arc::new(resolver.clone()),
        make,
        destination,
        metrics.clone(),
    );
    let proxy = OutboundProxy::new(
        OutboundConfig {
            id: "order-1".into(),
            zone: "xingren.host".into(),
            request_timeout,
            connect_timeout: Duration::from_secs(1),
            body_idle_timeout: Duration::from_secs(60),
            egress: Egress::Allow,
        },
        destinations,
        metrics.clone(),
    )
    .unwrap();
    tokio::spawn(proxy.serve(listener, CancellationToken::new(), Duration::from_secs(1)));
    Outbound { addr, metrics }
}

#[tokio::test]
async fn app_request_reaches_peer_app_by_service_name() {
    let app = support::app("127.0.0.2", "user").await;
    let peer = inbound("127.0.0.2", "user", app, MtlsMode::Permissive).await;
    let resolver = StaticResolver::new(Duration::from_secs(5));
    resolver.set(&name("user"), &[peer]);
    let out = outbound(&resolver, Duration::from_secs(5)).await;

    // Absolute form, as with http_proxy.
    let rsp = support::get_via(out.addr, "http://user/users/1?x=1").await;
    assert_eq!(rsp.status(), 200);
    let text = rsp.text().await.unwrap();
    assert!(text.starts_with("user /users/1 "), "{text}");
    // Plain callers have no identity; the hop list stays inside the mesh.
    assert!(text.contains("caller=- "), "{text}");
    assert!(text.contains("hop=-"), "{text}");

    // Origin form with a Host header, straight to the port.
    let rsp = support::direct()
        .get(format!("http://{}/users/2", out.addr))
        .header("host", "user.xingren.host")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert!(rsp.text().await.unwrap().starts_with("user /users/2 "));

    let metrics = out.metrics.encode();
    assert!(
        metrics.contains(
            "signpost_sidecar_requests_total{direction=\"outbound\",service=\"user\",status=\"200\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("signpost_sidecar_endpoints{service=\"user\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn caller_header_from_outside_is_dropped() {
    let app = support::app("127.0.0.3", "user").await;
    let peer = inbound("127.0.0.3", "user", app, MtlsMode::Permissive).await;
    let rsp = support::direct()
        .get(format!("http://{peer}/x"))
        .header("x-signpost-caller", "admin")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert!(rsp.text().await.unwrap().contains("caller=- "));
}

#[tokio::test]
async fn unknown_service_gets_a_readable_503() {
    let resolver = StaticResolver::new(Duration::from_secs(5));
    let out = outbound(&resolver, Duration::from_secs(5)).await;
    let rsp = support::get_via(out.addr, "http://nobody/").await;
    assert_eq!(rsp.status(), 503);
    assert_eq!(support::mesh_error(&rsp), "no healthy instance of nobody");
}

#[tokio::test]
async fn refused_connection_is_a_502_naming_the_peer() {
    let dead = support::closed_port("127.0.0.4").await;
    let resolver = StaticResolver::new(Duration::from_secs(5));
    resolver.set(&name("user"), &[dead]);
    let out = outbound(&resolver, Duration::from_secs(5)).await;
    let rsp = support::get_via(out.addr, "http://user/").await;
    assert_eq!(rsp.status(), 502);
    let error = support::mesh_error(&rsp);
    assert_eq!(error, format!("user: connection refused by {dead}"));
}

#[tokio::test]
async fn connect_failure_is_retried_on_the_other_endpoint() {
    let app = support::app("127.0.0.5", "user").await;
    let good = inbound("127.0.0.5", "user", app, MtlsMode::Permissive).await;
    let dead = support::closed_port("127.0.0.6").await;
    let resolver = StaticResolver::new(Duration::from_secs(5));
    // The dead endpoint weighs far more, so the balancer tries it first.
    resolver.set_endpoints(
        &name("user"),
        vec![
            Endpoint {
                addr: good,
                weight: 1,
            },
            Endpoint {
                addr: dead,
                weight: 65535,
            },
        ],
    );
    let out = outbound(&resolver, Duration::from_secs(5)).await;
    let client = support::proxied(out.addr);
    for i in 0..20 {
        let rsp = client.get(format!("http://user/{i}")).send().await.unwrap();
        assert_eq!(rsp.status(), 200, "request {i}");
    }
    let metrics = out.metrics.encode();
    let retries: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("signpost_sidecar_retries_total{service=\"user\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(retries >= 1, "no retry counted:\n{metrics}");
}

#[tokio::test]
async fn request_timeout_is_a_504() {
    let app = support::app("127.0.0.7", "user").await;
    let peer = inbound("127.0.0.7", "user", app, MtlsMode::Permissive).await;
    let resolver = StaticResolver::new(Duration::from_secs(5));
    resolver.set(&name("user"), &[peer]);
    let out = outbound(&resolver, Duration::from_millis(300)).await;
    let rsp = support::get_via(out.addr, "http://user/sleep/2000").await;
    assert_eq!(rsp.status(), 504);
    assert_eq!(support::mesh_error(&rsp), "user: no response within 300ms");
}

#[tokio::test]
async fn request_that_already_passed_this_sidecar_is_refused() {
    let resolver = StaticResolver::new(Duration::from_secs(5));
    let out = outbound(&resolver, Duration::from_secs(5)).await;
    let rsp = support::proxied(out.addr)
        .get("http://user/")
        .header("x-signpost-hop", "user-1, order-1")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 508);
    assert!(
        rsp.headers()["x-signpost-error"]
            .to_str()
            .unwrap()
            .starts_with("loop detected")
    );
}

/// A real loop: a name outside the mesh that leads back to this outbound.
#[tokio::test]
async fn request_sent_out_that_comes_back_is_refused() {
    let resolver = StaticResolver::new(Duration::from_secs(5));
    let out = outbound(&resolver, Duration::from_secs(5)).await;
    let rsp = support::get_via(out.addr, &format!("http://{}/again", out.addr)).await;
    assert_eq!(rsp.status(), 508);
    assert!(
        support::mesh_error(&rsp).starts_with("loop detected"),
        "{}",
        support::mesh_error(&rsp)
    );
}

#[tokio::test]
async fn names_outside_the_zone_go_straight_out() {
    let app = support::app("127.0.0.8", "outside").await;
    let resolver = StaticResolver::new(Duration::from_secs(5));
    let out = outbound(&resolver, Duration::from_secs(5)).await;
    let rsp = support::get_via(out.addr, &format!("http://{app}/plain")).await;
    assert_eq!(rsp.status(), 200);
    assert!(rsp.text().await.unwrap().starts_with("outside /plain "));
}

#[tokio::test]
async fn strict_inbound_refuses_plaintext() {
    let app = support::app("127.0.0.9", "user").await;
    let peer = inbound("127.0.0.9", "user", app, MtlsMode::Strict).await;
    let rsp = support::direct()
        .get(format!("http://{peer}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 403);
    let error = support::mesh_error(&rsp);
    assert_eq!(
        error,
        "a caller without a mesh certificate is not allowed to call user"
    );
    assert!(rsp.text().await.unwrap().contains("mtls: strict"));
}

#[tokio::test]
async fn pending_requests_past_the_cap_get_503_at_once() {
    let app = support::app("127.0.0.10", "user").await;
    let peer = inbound("127.0.0.10", "user", app, MtlsMode::Permissive).await;
    let resolver = StaticResolver::new(Duration::from_secs(5));
    resolver.set(&name("user"), &[peer]);
    let out = outbound_with(
        &resolver,
        Duration::from_secs(10),
        DestinationConfig {
            max_pending: 2,
            ..DestinationConfig::default()
        },
    )
    .await;
    let client = support::proxied(out.addr);
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(client.get("http://user/sleep/3000").send()))
        .collect();
    let shed = support::eventually(Duration::from_secs(2), "a request to be shed", || {
        let client = client.clone();
        async move {
            let started = std::time::Instant::now();
            let rsp = client.get("http://user/").send().await.ok()?;
            (rsp.status() == 503).then_some((rsp, started.elapsed()))
        }
    })
    .await;
    assert_eq!(
        shed.0.headers()["x-signpost-error"],
        "user: too many pending requests (limit 2)"
    );
    assert!(
        shed.1 < Duration::from_millis(500),
        "shed after {:?}",
        shed.1
    );
    for s in slow {
        assert_eq!(s.await.unwrap().unwrap().status(), 200);
    }
}

/// Starts a plain inbound like [`inbound`], stopped (no longer accepting,
/// draining) when `stop` fires.
async fn stoppable_inbound(ip: &str, app: SocketAddr, stop: CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let inbound = Inbound::new(
        InboundConfig {
            service: name("user"),
            id: format!("user-{ip}"),
            app,
            request_timeout: Duration::from_secs(5),
            app_protocol: AppProtocol::Auto,
        },
        Arc::new(ArcSwap::from_pointee(ServiceConfig::default())),
        None,
        Metrics::new(),
    );
    tokio::spawn(inbound.serve(listener, stop, Duration::from_secs(1)));
    addr
}

/// One instance in a rolling restart: its app and its stoppable inbound.
struct Instance {
    addr: SocketAddr,
    stop: CancellationToken,
}

async fn instance(ip: &str) -> Instance {
    let stop = CancellationToken::new();
    let app = support::app(ip, "user").await;
    let addr = stoppable_inbound(ip, app, stop.clone()).await;
    Instance { addr, stop }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_within_one_dns_ttl_fails_no_request() {
    // A TTL far longer than the restart: without asking DNS again when a
    // peer refuses connections, the balancer would only know the two old
    // instances when both are gone.
    let resolver = StaticResolver::new(Duration::from_secs(60));
    let (u1, u2) = (instance("127.0.0.11").await, instance("127.0.0.12").await);
    resolver.set(&name("user"), &[u1.addr, u2.addr]);
    let out = outbound(&resolver, Duration::from_secs(5)).await;
    let client = support::proxied(out.addr);
    let stream = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..400 {
                let rsp = client.get(format!("http://user/{i}")).send().await.unwrap();
                if rsp.status() != 200 {
                    let error = rsp.headers().get("x-signpost-error").cloned();
                    failures.push(format!("{i}: {} {error:?}", rsp.status()));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            failures
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // As `signpost sidecar` does on SIGTERM: the new instance is up, the old
    // one leaves DNS, lingers less than a TTL, then stops accepting.
    let u3 = instance("127.0.0.13").await;
    resolver.set(&name("user"), &[u2.addr, u3.addr]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    u1.stop.cancel();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let u4 = instance("127.0.0.14").await;
    resolver.set(&name("user"), &[u3.addr, u4.addr]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    u2.stop.cancel();
    let failures = stream.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    let metrics = out.metrics.encode();
    assert!(
        metrics.contains("signpost_sidecar_endpoints{service=\"user\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn app_refusing_connections_is_a_retryable_503() {
    let dead_app = support::closed_port("127.0.0.15").await;
    let peer = inbound("127.0.0.15", "user", dead_app, MtlsMode::Permissive).await;
    let rsp = support::direct()
        .get(format!("http://{peer}/users/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 503);
    let error = &support::mesh_error(&rsp);
    assert!(
        error.starts_with(&format!("user: app at {dead_app}: ")),
        "{error}"
    );

    // Through the mesh, the caller's sidecar retries it on a live instance.
    let app = support::app("127.0.0.16", "user").await;
    let good = inbound("127.0.0.16", "user", app, MtlsMode::Permissive).await;
    let resolver = StaticResolver::new(Duration::from_secs(5));
    resolver.set(&name("user"), &[peer, good]);
    let out = outbound(&resolver, Duration::from_secs(5)).await;
    let client = support::proxied(out.addr);
    for i in 0..20 {
        let rsp = client.get(format!("http://user/{i}")).send().await.unwrap();
        assert_eq!(rsp.status(), 200, "request {i}");
    }
}
