//! Forwarding names outside the zone: relayed from a real upstream on
//! loopback, SERVFAIL (quickly) when the upstream is dead or silent, REFUSED
//! for clients that may not recurse.

mod common;

use std::time::Duration;

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use signpost_dns::DnsConfig;
use tokio::net::UdpSocket;

/// An upstream: another Signpost DNS server, authoritative for `up.test`.
async fn upstream() -> Running {
    let mut fill = Fill::default();
    fill.put(&instance("web", "w1", "192.0.2.10", 80));
    let config = DnsConfig {
        zone: "up.test".into(),
        ..test_config()
    };
    start(config, &fill).await
}

#[tokio::test]
async fn outside_names_are_forwarded_and_relayed() {
    let up = upstream().await;
    let config = DnsConfig {
        upstreams: vec![up.addr],
        ..test_config()
    };
    let server = start(config, &standard_fill()).await;

    let (reply, _) = udp_exchange(
        server.addr,
        &query_message("web.up.test.", RecordType::A, None, true),
    )
    .await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(reply.metadata.recursion_available);
    assert!(
        !reply.metadata.authoritative,
        "a relayed answer is not ours"
    );
    assert_eq!(reply.answers.len(), 1);
    assert_eq!(
        reply.answers[0].data,
        RData::A("192.0.2.10".parse::<std::net::Ipv4Addr>().unwrap().into())
    );

    // The upstream's NXDOMAIN is relayed, with its SOA.
    let (nx, _) = udp_exchange(
        server.addr,
        &query_message("nope.up.test.", RecordType::A, None, true),
    )
    .await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(
        nx.authorities.first().map(|r| r.record_type()),
        Some(RecordType::SOA)
    );

    // Over TCP too.
    let tcp = tcp_exchange(
        server.addr,
        &query_message("web.up.test.", RecordType::A, None, true),
    )
    .await;
    assert_eq!(tcp.answers.len(), 1);

    // Without RD the client asked us only for what we know.
    let (no_rd, _) = udp_exchange(
        server.addr,
        &query_message("web.up.test.", RecordType::A, None, false),
    )
    .await;
    assert_eq!(no_rd.metadata.response_code, ResponseCode::Refused);

    // Our own zone is never forwarded.
    let (own, _) = udp_exchange(
        server.addr,
        &query_message("user.xingren.host.", RecordType::A, None, true),
    )
    .await;
    assert!(own.metadata.authoritative);
    assert_eq!(own.answers.len(), 2);
    server.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn clients_outside_allow_recursion_are_refused() {
    let up = upstream().await;
    let config = DnsConfig {
        upstreams: vec![up.addr],
        allow_recursion: vec!["10.0.0.0/8".parse().unwrap()],
        ..test_config()
    };
    let server = start(config, &standard_fill()).await;
    let (reply, _) = udp_exchange(
        server.addr,
        &query_message("web.up.test.", RecordType::A, None, true),
    )
    .await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    assert!(!reply.metadata.recursion_available);
    // The zone itself is still served to them.
    let (own, _) = udp_exchange(
        server.addr,
        &query_message("order.xingren.host.", RecordType::A, None, true),
    )
    .await;
    assert_eq!(own.answers.len(), 1);
    server.stop().await;
    up.stop().await;
}

/// Asks a server forwarding to `upstream` (800 ms timeout) for a name
/// outside the zone; checks the answer is SERVFAIL and returns how long it
/// took.
async fn servfail_from(upstream: std::net::SocketAddr) -> Duration {
    let config = DnsConfig {
        upstreams: vec![upstream],
        forward_timeout: Duration::from_millis(800),
        ..test_config()
    };
    let server = start(config, &standard_fill()).await;
    let started = tokio::time::Instant::now();
    let (reply, _) = udp_exchange(
        server.addr,
        &query_message("example.com.", RecordType::A, None, true),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    server.stop().await;
    took
}

#[tokio::test]
async fn a_dead_upstream_is_servfail() {
    // A port nobody listens on: the upstream refuses at once (ICMP).
    let dead = {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.local_addr().unwrap()
    };
    let took = servfail_from(dead).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn a_silent_upstream_is_servfail_within_the_timeout() {
    // A socket that reads queries and never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let sink = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while silent.recv_from(&mut buf).await.is_ok() {}
    });
    let took = servfail_from(silent_addr).await;
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "{took:?}"
    );
    sink.abort();
}

#[tokio::test]
async fn the_server_never_forwards_to_itself() {
    // Upstream = our own address: dropped, so forwarding is off.
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let config = DnsConfig {
        listen: addr,
        upstreams: vec![addr],
        ..test_config()
    };
    let server = start(config, &standard_fill()).await;
    let (reply, _) = udp_exchange(
        server.addr,
        &query_message("example.com.", RecordType::A, None, true),
    )
    .await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_past_the_bound_are_servfail_at_once() {
    // A dead upstream: UDP read and never answered, TCP accepted by the
    // kernel's backlog and never read.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _tcp = std::net::TcpListener::bind(silent_addr).unwrap();
    let sink = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while silent.recv_from(&mut buf).await.is_ok() {}
    });
    let config = DnsConfig {
        upstreams: vec![silent_addr],
        forward_timeout: Duration::from_millis(1500),
        max_forwards: 2,
        ..test_config()
    };
    let server = start(config, &standard_fill()).await;
    let addr = server.addr;
    let ask = move |name: &'static str| async move {
        let started = tokio::time::Instant::now();
        let (reply, _) = udp_exchange(addr, &query_message(name, RecordType::A, None, true)).await;
        (reply.metadata.response_code, started.elapsed())
    };

    // Two wait upstream (distinct names: nothing is shared or cached).
    let first = tokio::spawn(ask("a.example.com."));
    let second = tokio::spawn(ask("b.example.com."));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The third finds no room: SERVFAIL now, not after the timeout.
    let (rcode, took) = ask("c.example.com.").await;
    assert_eq!(rcode, ResponseCode::ServFail);
    assert!(took < Duration::from_millis(500), "{took:?}");
    // Our own zone is never held up by the bound.
    let (own, _) = udp_exchange(
        addr,
        &query_message("user.xingren.host.", RecordType::A, None, true),
    )
    .await;
    assert_eq!(own.answers.len(), 2);
    for waiting in [first, second] {
        let (rcode, took) = waiting.await.unwrap();
        assert_eq!(rcode, ResponseCode::ServFail);
        assert!(took >= Duration::from_millis(1300), "{took:?}");
    }
    // Room again: the next one is sent, and waits its timeout.
    let (rcode, took) = ask("d.example.com.").await;
    assert_eq!(rcode, ResponseCode::ServFail);
    assert!(took >= Duration::from_millis(1300), "{took:?}");
    server.stop().await;
    sink.abort();
}
