//! The hickory [`DnsResolver`] against a tiny UDP DNS server built here with
//! hickory-proto: SRV with additional addresses, SRV targets without them,
//! A-only names, unknown names, TTLs, and a dead server.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use signpost_control_plane::model::ServiceName;
use signpost_sidecar::discovery::{DEFAULT_INBOUND_PORT, DnsResolver, Endpoint, Resolve};
use tokio::net::UdpSocket;

const ZONE: &str = "xingren.host";

fn n(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

fn a(name: &str, ttl: u32, ip: [u8; 4]) -> Record {
    Record::from_rdata(n(name), ttl, RData::A(A(Ipv4Addr::from(ip))))
}

fn srv(name: &str, ttl: u32, weight: u16, port: u16, target: &str) -> Record {
    Record::from_rdata(
        n(name),
        ttl,
        RData::SRV(SRV::new(10, weight, port, n(target))),
    )
}

fn soa() -> Record {
    Record::from_rdata(
        n("xingren.host."),
        5,
        RData::SOA(SOA::new(
            n("ns.xingren.host."),
            n("admin.xingren.host."),
            1,
            60,
            10,
            600,
            3,
        )),
    )
}

/// Answers like Signpost DNS for a fixed little zone.
fn answer(query: &Message) -> Message {
    let mut rsp = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    rsp.metadata.authoritative = true;
    rsp.metadata.recursion_desired = query.metadata.recursion_desired;
    let Some(q) = query.queries.first() else {
        rsp.metadata.response_code = ResponseCode::FormErr;
        return rsp;
    };
    rsp.add_query(q.clone());
    let name = q.name().to_lowercase().to_string();
    match (name.as_str(), q.query_type()) {
        ("user.xingren.host.", RecordType::SRV) => {
            rsp.add_answer(srv(
                "user.xingren.host.",
                7,
                100,
                15006,
                "u1.user.xingren.host.",
            ));
            rsp.add_answer(srv(
                "user.xingren.host.",
                7,
                50,
                16000,
                "u2.user.xingren.host.",
            ));
            // u2's address did not fit: the resolver must ask for it.
            rsp.add_additional(a("u1.user.xingren.host.", 7, [127, 0, 3, 1]));
        }
        ("u1.user.xingren.host.", RecordType::A) => {
            rsp.add_answer(a("u1.user.xingren.host.", 7, [127, 0, 3, 1]));
        }
        ("u2.user.xingren.host.", RecordType::A) => {
            rsp.add_answer(a("u2.user.xingren.host.", 7, [127, 0, 3, 2]));
        }
        ("legacy.xingren.host.", RecordType::A) => {
            rsp.add_answer(a("legacy.xingren.host.", 30, [127, 0, 3, 9]));
        }
        (
            "user.xingren.host."
            | "u1.user.xingren.host."
            | "u2.user.xingren.host."
            | "legacy.xingren.host."
            | "empty.xingren.host.",
            _,
        ) => {
            rsp.add_authority(soa());
        }
        _ => {
            rsp.metadata.response_code = ResponseCode::NXDomain;
            rsp.add_authority(soa());
        }
    }
    rsp
}

async fn dns_server() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((len, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            if let Ok(bytes) = answer(&query).to_vec() {
                let _ = socket.send_to(&bytes, from).await;
            }
        }
    });
    addr
}

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

#[tokio::test]
async fn srv_gives_addresses_ports_and_weights() {
    let resolver = DnsResolver::new(dns_server().await, ZONE).unwrap();
    let res = resolver.resolve(&svc("user")).await.unwrap();
    assert_eq!(
        res.endpoints,
        vec![
            Endpoint {
                addr: "127.0.3.1:15006".parse().unwrap(),
                weight: 100
            },
            Endpoint {
                addr: "127.0.3.2:16000".parse().unwrap(),
                weight: 50
            },
        ]
    );
    assert!(
        res.ttl <= Duration::from_secs(7) && res.ttl >= Duration::from_secs(5),
        "ttl {:?}",
        res.ttl
    );
}

#[tokio::test]
async fn a_records_alone_use_the_default_inbound_port() {
    let resolver = DnsResolver::new(dns_server().await, ZONE).unwrap();
    let res = resolver.resolve(&svc("legacy")).await.unwrap();
    assert_eq!(
        res.endpoints,
        vec![Endpoint {
            addr: SocketAddr::from(([127, 0, 3, 9], DEFAULT_INBOUND_PORT)),
            weight: 100
        }]
    );
}

#[tokio::test]
async fn unknown_or_empty_services_resolve_to_nothing() {
    let resolver = DnsResolver::new(dns_server().await, ZONE).unwrap();
    for name in ["nobody", "empty"] {
        let res = resolver.resolve(&svc(name)).await.unwrap();
        assert!(res.endpoints.is_empty(), "{name}: {res:?}");
        assert!(res.ttl >= Duration::from_secs(1), "{name}: {res:?}");
    }
}

#[tokio::test]
async fn dead_server_is_an_error_not_an_empty_answer() {
    // A bound UDP socket that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let resolver = DnsResolver::new(silent.local_addr().unwrap(), ZONE).unwrap();
    let err = resolver.resolve(&svc("user")).await.unwrap_err();
    assert!(err.to_string().contains("user.xingren.host"), "{err}");
}
