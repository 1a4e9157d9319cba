//! Whole sidecars (`Sidecar::start_with_resolver`) against an in-process
//! control plane with an in-memory store and CA: certificates, registration,
//! health, config-driven allow-lists, tunnels, admin, graceful shutdown.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use signpost_certs::Ca;
use signpost_control_plane::api::auth::AuthConfig;
use signpost_control_plane::api::certs::CertAuthority;
use signpost_control_plane::client::Client;
use signpost_control_plane::model::{
    HealthStatus, InstanceId, MtlsMode, ServiceConfig, ServiceName,
};
use signpost_control_plane::server::{ControlPlane, ControlPlaneOptions};
use signpost_control_plane::store::{Keys, MemoryStore};
use signpost_sidecar::discovery::StaticResolver;
use signpost_sidecar::{Sidecar, SidecarConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const ZONE: &str = "xingren.host";

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

/// A `--dev` control plane with a CA: loopback callers need no token.
async fn control_plane(cancel: &CancellationToken) -> String {
    let ca = Ca::generate_in_memory().unwrap();
    let cp = ControlPlane::start(
        ControlPlaneOptions {
            api: "127.0.0.1:0".parse().unwrap(),
            store: Arc::new(MemoryStore::new()),
            keys: Keys::new("/signpost/"),
            auth: AuthConfig {
                admin_hash: None,
                dev: true,
            },
            candidate: "test".into(),
            compaction: None,
            api_policy: Default::default(),
            ca: Some(Arc::new(CertAuthority {
                ca,
                zone: ZONE.into(),
                cert_ttl: Duration::from_secs(3600),
            })),
        },
        Registry::default(),
        None,
        cancel.clone(),
    )
    .await
    .unwrap();
    format!("http://{}", cp.api_addr)
}

fn config(service: &str, id: &str, ip: &str, app: SocketAddr, cp: &str) -> SidecarConfig {
    let any = |port: u16| SocketAddr::new(ip.parse().unwrap(), port);
    let mut config = SidecarConfig::new(
        name(service),
        InstanceId::new(id).unwrap(),
        ip.parse().unwrap(),
        app,
        cp,
        // Unused: these tests inject a static resolver.
        "127.0.0.1:53".parse().unwrap(),
    );
    config.inbound = any(0);
    config.outbound = any(0);
    config.admin = any(0);
    config.ttl = Duration::from_secs(3);
    config.shutdown_linger = Duration::from_millis(500);
    config.drain = Duration::from_secs(2);
    config.health_interval = Duration::from_millis(200);
    config
}

async fn ready(sidecar: &Sidecar) {
    support::eventually(
        Duration::from_secs(15),
        "the sidecar to be ready",
        || async { sidecar.is_ready().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn two_sidecars_register_talk_and_leave() {
    let cancel = CancellationToken::new();
    let cp = control_plane(&cancel).await;
    let client = Client::new(&cp, None).unwrap();

    let user_app = support::app("127.0.2.1", "user").await;
    let order_app = support::app("127.0.2.2", "order").await;
    let resolver = StaticResolver::new(Duration::from_secs(1));

    let user_stop = CancellationToken::new();
    let mut user_config = config("user", "u1", "127.0.2.1", user_app, &cp);
    user_config.app_health = Some("/status/200".into());
    let user =
        Sidecar::start_with_resolver(user_config, Arc::new(resolver.clone()), user_stop.clone())
            .await
            .unwrap();
    resolver.set(&name("user"), &[user.inbound]);

    let order_stop = CancellationToken::new();
    let mut order_config = config("order", "o1", "127.0.2.2", order_app, &cp);
    order_config.app_health = Some("/status/500".into());
    order_config.upstreams = vec![(name("user"), "127.0.2.2:0".parse().unwrap())];
    let order =
        Sidecar::start_with_resolver(order_config, Arc::new(resolver.clone()), order_stop.clone())
            .await
            .unwrap();
    ready(&user).await;
    ready(&order).await;

    // Registered at the inbound port, with the health its probe saw.
    let view = client
        .service(&name("user"), None, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(view.instances.len(), 1);
    let instance = &view.instances[0];
    assert_eq!(instance.instance.port, user.inbound.port());
    assert_eq!(
        instance.instance.ports.get("http").copied(),
        Some(user.inbound.port())
    );
    assert_eq!(instance.instance.ttl, Some(Duration::from_secs(3)));
    support::eventually(
        Duration::from_secs(10),
        "order's app to be reported critical",
        || {
            let client = client.clone();
            async move {
                let view = client
                    .service(&name("order"), None, Duration::ZERO)
                    .await
                    .ok()?;
                (view.instances.first()?.health.status == HealthStatus::Critical).then_some(())
            }
        },
    )
    .await;

    // order's app calls user through both sidecars, over mesh TLS.
    let app_client = support::proxied(order.outbound);
    let rsp = app_client.get("http://user/users/1").send().await.unwrap();
    assert_eq!(rsp.status(), 200);
    let text = rsp.text().await.unwrap();
    assert!(text.starts_with("user /users/1 caller=order "), "{text}");

    // The tunnel carries raw bytes to user's app.
    let tunnel = order.upstreams[0].1;
    let mut raw = tokio::net::TcpStream::connect(tunnel).await.unwrap();
    raw.write_all(b"GET /raw HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("user /raw caller=-"), "{answer}");

    // Closing user to everyone but billing applies without a restart.
    client
        .put_config(
            &name("user"),
            &ServiceConfig {
                allow: vec![name("billing")],
                mtls: MtlsMode::Strict,
            },
        )
        .await
        .unwrap();
    let refused = support::eventually(Duration::from_secs(10), "the allow-list to apply", || {
        let app_client = app_client.clone();
        async move {
            let rsp = app_client.get("http://user/").send().await.ok()?;
            (rsp.status() == 403).then_some(rsp)
        }
    })
    .await;
    assert_eq!(
        support::mesh_error(&refused),
        "order is not allowed to call user"
    );

    // Admin port.
    let admin = support::direct();
    let ready_rsp = admin
        .get(format!("http://{}/ready", order.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready_rsp.status(), 200);
    let metrics = admin
        .get(format!("http://{}/metrics", order.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "signpost_sidecar_requests_total{direction=\"outbound\",service=\"user\",status=\"200\"} 1",
        "signpost_sidecar_endpoints{service=\"user\"} 1",
        "signpost_sidecar_certificate_expiry_seconds ",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    assert!(!metrics.contains("signpost_sidecar_certificate_expiry_seconds 0\n"));

    // Shutdown: user leaves the catalog first, keeps serving for the
    // linger time, then stops with Ok.
    user_stop.cancel();
    support::eventually(Duration::from_secs(5), "user to deregister", || {
        let client = client.clone();
        async move {
            let view = client
                .service(&name("user"), None, Duration::ZERO)
                .await
                .ok()?;
            view.instances.is_empty().then_some(())
        }
    })
    .await;
    let user_admin = user.admin;
    let still = support::direct()
        .get(format!("http://{user_admin}/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(still.status(), 503, "not ready while shutting down");
    tokio::time::timeout(Duration::from_secs(10), user.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(user_admin).await.is_err());

    order_stop.cancel();
    order.wait().await.unwrap();
    cancel.cancel();
}

#[tokio::test]
async fn not_ready_until_the_control_plane_answers() {
    let dead = support::closed_port("127.0.2.3").await;
    let app = support::app("127.0.2.3", "user").await;
    let stop = CancellationToken::new();
    let sidecar = Sidecar::start_with_resolver(
        config("user", "u9", "127.0.2.3", app, &format!("http://{dead}")),
        Arc::new(StaticResolver::new(Duration::from_secs(1))),
        stop.clone(),
    )
    .await
    .unwrap();
    let rsp = support::direct()
        .get(format!("http://{}/ready", sidecar.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 503);
    assert!(rsp.text().await.unwrap().contains("no certificate yet"));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), sidecar.wait())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn bind_failure_names_the_listener() {
    let taken = tokio::net::TcpListener::bind("127.0.2.4:0").await.unwrap();
    let app = support::app("127.0.2.4", "user").await;
    let mut config = config("user", "u8", "127.0.2.4", app, "http://127.0.0.1:1");
    config.admin = taken.local_addr().unwrap();
    let err = Sidecar::start_with_resolver(
        config,
        Arc::new(StaticResolver::new(Duration::from_secs(1))),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot listen for admin on 127.0.2.4:"),
        "{err}"
    );
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests() {
    let cancel = CancellationToken::new();
    let cp = control_plane(&cancel).await;
    let app = support::app("127.0.2.5", "user").await;
    let stop = CancellationToken::new();
    let mut config = config("user", "u5", "127.0.2.5", app, &cp);
    config.shutdown_linger = Duration::from_millis(300);
    config.drain = Duration::from_secs(5);
    let sidecar = Sidecar::start_with_resolver(
        config,
        Arc::new(StaticResolver::new(Duration::from_secs(1))),
        stop.clone(),
    )
    .await
    .unwrap();
    ready(&sidecar).await;
    // A plain caller (the service is permissive by default), slower than
    // the linger time: it must still get its answer.
    let slow = tokio::spawn(
        support::direct()
            .get(format!("http://{}/sleep/1500", sidecar.inbound))
            .send(),
    );
    stop.cancel();
    let rsp = slow.await.unwrap().unwrap();
    assert_eq!(rsp.status(), 200);
    assert!(rsp.text().await.unwrap().starts_with("user /sleep/1500"));
    tokio::time::timeout(Duration::from_secs(10), sidecar.wait())
        .await
        .unwrap()
        .unwrap();
    cancel.cancel();
}

#[tokio::test]
async fn app_pointing_at_the_sidecar_is_refused() {
    let mut config = config(
        "user",
        "u7",
        "127.0.2.6",
        "127.0.2.6:15006".parse().unwrap(),
        "http://127.0.0.1:1",
    );
    config.inbound = "0.0.0.0:15006".parse().unwrap();
    let err = Sidecar::start_with_resolver(
        config,
        Arc::new(StaticResolver::new(Duration::from_secs(1))),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("requests would loop"), "{err}");
}

#[tokio::test]
async fn lost_registration_is_made_again() {
    let cancel = CancellationToken::new();
    let cp = control_plane(&cancel).await;
    let client = Client::new(&cp, None).unwrap();
    let app = support::app("127.0.2.7", "user").await;
    let stop = CancellationToken::new();
    let sidecar = Sidecar::start_with_resolver(
        config("user", "u4", "127.0.2.7", app, &cp),
        Arc::new(StaticResolver::new(Duration::from_secs(1))),
        stop.clone(),
    )
    .await
    .unwrap();
    ready(&sidecar).await;
    // Someone (or an expired lease) removes the instance: the next
    // heartbeat gets 404 and the sidecar registers again.
    client
        .deregister(&name("user"), &InstanceId::new("u4").unwrap())
        .await
        .unwrap();
    support::eventually(Duration::from_secs(10), "user to register again", || {
        let client = client.clone();
        async move {
            let view = client
                .service(&name("user"), None, Duration::ZERO)
                .await
                .ok()?;
            (view.instances.len() == 1).then_some(())
        }
    })
    .await;
    stop.cancel();
    sidecar.wait().await.unwrap();
    cancel.cancel();
}
