//! Mesh TLS between an outbound and an inbound: identities, allow-lists,
//! strict and permissive modes, with certificates from an in-memory CA.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use signpost_certs::{Ca, CertHolder, Identity, ServerIdentityVerifier, TrustBundle};
use signpost_control_plane::model::{MtlsMode, ServiceConfig, ServiceName};
use signpost_sidecar::config::AppProtocol;
use signpost_sidecar::discovery::StaticResolver;
use signpost_sidecar::inbound::{Inbound, InboundConfig};
use signpost_sidecar::metrics::Metrics;
use signpost_sidecar::outbound::endpoint::{Connect, PeerProtocol};
use signpost_sidecar::outbound::proxy::{Egress, OutboundConfig, OutboundProxy};
use signpost_sidecar::outbound::{DestinationConfig, Destinations, MakeConnect};
use signpost_sidecar::tls::{ALPN_TCP, MeshSlot, MeshTls};

/// The ALPN a sidecar negotiates for `protocol`.
fn alpn(protocol: PeerProtocol) -> &'static [u8] {
    match protocol {
        PeerProtocol::Http2 => signpost_certs::ALPN_H2,
        PeerProtocol::Http1 => signpost_certs::ALPN_HTTP1,
        PeerProtocol::Tcp => ALPN_TCP,
    }
}
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const ZONE: &str = "xingren.host";

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

struct Mesh {
    ca: Ca,
}

impl Mesh {
    fn new() -> Self {
        Self {
            ca: Ca::generate_in_memory().unwrap(),
        }
    }

    fn bundle(&self) -> TrustBundle {
        self.ca.trust_bundle()
    }

    fn tls(&self, service: &str, metrics: &Metrics) -> MeshTls {
        let identity = Identity::new(service, ZONE).unwrap();
        let cert = self.ca.issue(&identity, Duration::from_secs(3600)).unwrap();
        MeshTls::new(
            self.bundle(),
            Arc::new(CertHolder::new(cert)),
            ZONE,
            metrics.clone(),
        )
    }
}

struct Peer {
    addr: SocketAddr,
    tls: MeshTls,
    policy: Arc<ArcSwap<ServiceConfig>>,
    metrics: Metrics,
}

async fn inbound(mesh: &Mesh, ip: &str, service: &str, mode: MtlsMode) -> Peer {
    let app = support::app(ip, "app").await;
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Metrics::new();
    let policy = Arc::new(ArcSwap::from_pointee(ServiceConfig {
        allow: vec![],
        mtls: mode,
    }));
    let mesh_tls = mesh.tls(service, &metrics);
    let tls = MeshSlot::filled(mesh_tls.clone());
    let inbound = Inbound::new(
        InboundConfig {
            service: name(service),
            id: format!("{service}-1"),
            app,
            request_timeout: Duration::from_secs(5),
            app_protocol: AppProtocol::Auto,
        },
        policy.clone(),
        Some(tls),
        metrics.clone(),
    );
    tokio::spawn(inbound.serve(listener, CancellationToken::new(), Duration::from_secs(1)));
    Peer {
        addr,
        tls: mesh_tls,
        policy,
        metrics,
    }
}

async fn outbound(mesh: &Mesh, service: &str, resolver: &StaticResolver) -> (SocketAddr, Metrics) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Metrics::new();
    let tls = mesh.tls(service, &metrics);
    let make: MakeConnect = Arc::new(move |svc: &ServiceName, protocol: PeerProtocol| {
        Arc::new(tls.connector(svc, alpn(protocol)).unwrap()) as Arc<dyn Connect>
    });
    let destinations = Destinations::new(
        Arc::new(resolver.clone()),
        make,
        DestinationConfig::default(),
        metrics.clone(),
    );
    let proxy = OutboundProxy::new(
        OutboundConfig {
            id: format!("{service}-1"),
            zone: ZONE.into(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            body_idle_timeout: Duration::from_secs(60),
            egress: Egress::Allow,
        },
        destinations,
        metrics.clone(),
    )
    .unwrap();
    tokio::spawn(proxy.serve(listener, CancellationToken::new(), Duration::from_secs(1)));
    (addr, metrics)
}

#[tokio::test]
async fn mtls_call_tells_the_app_who_called() {
    let mesh = Mesh::new();
    let user = inbound(&mesh, "127.0.1.1", "user", MtlsMode::Strict).await;
    let resolver = StaticResolver::new(Duration::from_secs(5));
    resolver.set(&name("user"), &[user.addr]);
    let (out, _) = outbound(&mesh, "order", &resolver).await;
    let rsp = support::get_via(out, "http://user/hello").await;
    assert_eq!(rsp.status(), 200);
    let text = rsp.text().await.unwrap();
    assert!(text.contains("caller=order "), "{text}");
    assert!(text.contains("host=user.xingren.host"), "{text}");
}

#[tokio::test]
async fn allow_list_refuses_other_callers_and_follows_changes() {
    let mesh = Mesh::new();
    let user = inbound(&mesh, "127.0.1.2", "user", MtlsMode::Permissive).await;
    user.policy.store(Arc::new(ServiceConfig {
        allow: vec![name("billing")],
        mtls: MtlsMode::Permissive,
    }));
    let resolver = StaticResolver::new(Duration::from_secs(5));
    resolver.set(&name("user"), &[user.addr]);
    let (out, _) = outbound(&mesh, "order", &resolver).await;
    let client = support::proxied(out);
    let rsp = client.get("http://user/").send().await.unwrap();
    assert_eq!(rsp.status(), 403);
    assert_eq!(
        support::mesh_error(&rsp),
        "order is not allowed to call user"
    );
    let body = rsp.text().await.unwrap();
    assert!(body.contains("spiffe://xingren.host/svc/order"), "{body}");

    // Allowing order applies to the next request on the same connection.
    user.policy.store(Arc::new(ServiceConfig {
        allow: vec![name("billing"), name("order")],
        mtls: MtlsMode::Permissive,
    }));
    let rsp = client.get("http://user/").send().await.unwrap();
    assert_eq!(rsp.status(), 200);
}

#[tokio::test]
async fn peer_with_another_identity_is_refused() {
    let mesh = Mesh::new();
    // DNS (wrongly) points "user" at billing's sidecar.
    let billing = inbound(&mesh, "127.0.1.3", "billing", MtlsMode::Permissive).await;
    let resolver = StaticResolver::new(Duration::from_secs(5));
    resolver.set(&name("user"), &[billing.addr]);
    let (out, metrics) = outbound(&mesh, "order", &resolver).await;
    let rsp = support::get_via(out, "http://user/").await;
    assert_eq!(rsp.status(), 502);
    let error = support::mesh_error(&rsp);
    assert!(error.starts_with("user: TLS handshake with"), "{error}");
    assert!(error.contains("wrong_identity"), "{error}");
    let text = metrics.encode();
    assert!(
        text.contains("signpost_sidecar_tls_handshake_failures_total{reason=\"wrong_identity\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn another_mesh_is_refused() {
    let mesh = Mesh::new();
    let other = Mesh::new();
    let user = inbound(&mesh, "127.0.1.4", "user", MtlsMode::Permissive).await;
    let resolver = StaticResolver::new(Duration::from_secs(5));
    resolver.set(&name("user"), &[user.addr]);
    let (out, _) = outbound(&other, "order", &resolver).await;
    let rsp = support::get_via(out, "http://user/").await;
    assert_eq!(rsp.status(), 502);
    let error = support::mesh_error(&rsp);
    assert!(error.contains("unknown_ca"), "{error}");
}

/// Sends one HTTP/1.1 request over TLS without a client certificate and
/// returns what came back (empty when the server hung up).
async fn certless_request(mesh: &Mesh, addr: SocketAddr, service: &str) -> String {
    let expected = Identity::new(service, ZONE).unwrap();
    let server_name = expected.server_name().unwrap();
    let verifier = ServerIdentityVerifier::new(&mesh.bundle(), expected).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(signpost_certs::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let Ok(mut tls) = connector.connect(server_name, tcp).await else {
        return String::new();
    };
    let request = format!("GET / HTTP/1.1\r\nhost: {service}\r\nconnection: close\r\n\r\n");
    if tls.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn strict_refuses_tls_without_a_client_certificate() {
    let mesh = Mesh::new();
    let user = inbound(&mesh, "127.0.1.5", "user", MtlsMode::Strict).await;
    let answer = certless_request(&mesh, user.addr, "user").await;
    assert!(!answer.contains("HTTP/1.1 200"), "{answer}");
    let text = user.metrics.encode();
    assert!(
        text.contains("signpost_sidecar_tls_handshake_failures_total{reason=\"no_client_cert\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn permissive_takes_tls_without_a_client_certificate_as_anonymous() {
    let mesh = Mesh::new();
    let user = inbound(&mesh, "127.0.1.6", "user", MtlsMode::Permissive).await;
    let answer = certless_request(&mesh, user.addr, "user").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("caller=- "), "{answer}");
}

#[tokio::test]
async fn new_trust_bundle_applies_to_new_connections() {
    let old = Mesh::new();
    let new = Mesh::new();
    // user already has a certificate from the new CA and trusts both.
    let user = inbound(&new, "127.0.1.7", "user", MtlsMode::Permissive).await;
    let mut both = old.bundle();
    both.merge(&new.bundle());
    assert!(user.tls.set_bundle(both.clone()).unwrap());
    let resolver = StaticResolver::new(Duration::from_secs(5));
    resolver.set(&name("user"), &[user.addr]);

    // order still trusts only the old CA.
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let out = listener.local_addr().unwrap();
    let metrics = Metrics::new();
    let tls = old.tls("order", &metrics);
    let connector_tls = tls.clone();
    let make: MakeConnect = Arc::new(move |svc: &ServiceName, protocol: PeerProtocol| {
        Arc::new(connector_tls.connector(svc, alpn(protocol)).unwrap()) as Arc<dyn Connect>
    });
    let destinations = Destinations::new(
        Arc::new(resolver.clone()),
        make,
        DestinationConfig::default(),
        metrics.clone(),
    );
    let proxy = OutboundProxy::new(
        OutboundConfig {
            id: "order-1".into(),
            zone: ZONE.into(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            body_idle_timeout: Duration::from_secs(60),
            egress: Egress::Allow,
        },
        destinations,
        metrics.clone(),
    )
    .unwrap();
    tokio::spawn(proxy.serve(listener, CancellationToken::new(), Duration::from_secs(1)));
    let client = support::proxied(out);
    let refused = client.get("http://user/").send().await.unwrap();
    assert_eq!(refused.status(), 502);
    let error = &support::mesh_error(&refused);
    assert!(error.contains("unknown_ca"), "{error}");

    assert!(tls.set_bundle(both.clone()).unwrap());
    assert!(!tls.set_bundle(both).unwrap(), "same bundle: no change");
    assert_eq!(
        client.get("http://user/").send().await.unwrap().status(),
        200
    );
}
