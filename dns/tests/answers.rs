//! The DNS table of CONTRACT.md answered by a running server, over UDP and
//! TCP, with hickory's client, raw messages and `dig`.

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

fn addrs(records: &[Record]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = list.iter().map(|s| s.parse().unwrap()).collect();
    v.sort();
    v
}

async fn udp_client(addr: std::net::SocketAddr) -> Client<TokioRuntimeProvider> {
    let stream = UdpClientStream::builder(addr, TokioRuntimeProvider::default())
        .with_timeout(Some(STEP))
        .build();
    let (client, bg) = Client::<TokioRuntimeProvider>::from_sender(stream);
    tokio::spawn(bg);
    client
}

async fn tcp_client(addr: std::net::SocketAddr) -> Client<TokioRuntimeProvider> {
    let (stream, sender) =
        TcpClientStream::new(addr, None, Some(STEP), TokioRuntimeProvider::default());
    let stream = tokio::time::timeout(STEP, stream).await.unwrap().unwrap();
    let (client, bg) = Client::<TokioRuntimeProvider>::new(stream, sender);
    tokio::spawn(bg);
    client
}

/// Every row of the table, asked with hickory's client over UDP and TCP.
#[tokio::test]
async fn hickory_client_gets_every_row_over_udp_and_tcp() {
    let server = start(test_config(), &standard_fill()).await;
    for tcp in [false, true] {
        let mut client = if tcp {
            tcp_client(server.addr).await
        } else {
            udp_client(server.addr).await
        };
        let mut ask = async |name: &str, qtype: RecordType| {
            let resp = client
                .query(Name::from_ascii(name).unwrap(), DNSClass::IN, qtype)
                .await
                .unwrap_or_else(|e| panic!("{name} {qtype} (tcp {tcp}): {e}"));
            resp.into_message()
        };

        let a = ask("user.xingren.host.", RecordType::A).await;
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert!(a.metadata.authoritative);
        assert_eq!(addrs(&a.answers), ips(&["10.0.0.1", "10.0.0.2"]));
        assert!(a.answers.iter().all(|r| r.ttl == 5));

        let aaaa = ask("user.xingren.host.", RecordType::AAAA).await;
        assert_eq!(addrs(&aaaa.answers), ips(&["fd00::6"]));

        let srv = ask("user.xingren.host.", RecordType::SRV).await;
        assert_eq!(srv.answers.len(), 3);
        for r in &srv.answers {
            let RData::SRV(s) = &r.data else {
                panic!("{r:?}")
            };
            assert_eq!((s.priority, s.weight), (10, 100));
        }
        assert_eq!(
            addrs(&srv.additionals),
            ips(&["10.0.0.1", "10.0.0.2", "fd00::6"])
        );

        let port = ask("_http._tcp.user.xingren.host.", RecordType::SRV).await;
        assert_eq!(port.answers.len(), 1);
        let RData::SRV(s) = &port.answers[0].data else {
            panic!()
        };
        assert_eq!(
            (s.port, s.target.to_ascii().as_str()),
            (8081, "u1.user.xingren.host.")
        );

        let inst = ask("u1.user.xingren.host.", RecordType::A).await;
        assert_eq!(addrs(&inst.answers), ips(&["10.0.0.1"]));
        let txt = ask("u1.user.xingren.host.", RecordType::TXT).await;
        assert_eq!(txt.answers.len(), 1);
        assert_eq!(txt.answers[0].data.to_string(), "version=1.2.3");

        let tag = ask("v2.tag.user.xingren.host.", RecordType::A).await;
        assert_eq!(addrs(&tag.answers), ips(&["10.0.0.1"]));
        let tag_srv = ask("v2.tag.user.xingren.host.", RecordType::SRV).await;
        assert_eq!(tag_srv.answers.len(), 1);

        let sd = ask("_services._dns-sd._udp.xingren.host.", RecordType::PTR).await;
        let mut names: Vec<String> = sd.answers.iter().map(|r| r.data.to_string()).collect();
        names.sort();
        assert_eq!(
            names,
            vec!["_order._tcp.xingren.host.", "_user._tcp.xingren.host."]
        );

        let rev = ask("2.0.0.10.in-addr.arpa.", RecordType::PTR).await;
        assert!(rev.metadata.authoritative);
        assert_eq!(rev.answers[0].data.to_string(), "u2.user.xingren.host.");

        let soa = ask("xingren.host.", RecordType::SOA).await;
        let RData::SOA(s) = &soa.answers[0].data else {
            panic!()
        };
        assert_eq!(s.mname.to_ascii(), "ns.xingren.host.");
        let ns = ask("xingren.host.", RecordType::NS).await;
        assert_eq!(ns.answers[0].data.to_string(), "ns.xingren.host.");

        let nx = ask("nobody.xingren.host.", RecordType::A).await;
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert!(nx.metadata.authoritative);
        assert_eq!(nx.authorities.len(), 1);
        assert_eq!(nx.authorities[0].record_type(), RecordType::SOA);

        let nodata = ask("order.xingren.host.", RecordType::TXT).await;
        assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());
        assert_eq!(nodata.authorities[0].record_type(), RecordType::SOA);
    }
    server.stop().await;
}

#[tokio::test]
async fn names_outside_the_zone_are_refused_without_upstreams() {
    let server = start(test_config(), &standard_fill()).await;
    let msg = query_message("example.com.", RecordType::A, None, true);
    let (reply, _) = udp_exchange(server.addr, &msg).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    assert!(!reply.metadata.recursion_available);
    server.stop().await;
}

#[tokio::test]
async fn question_case_is_echoed_exactly() {
    let server = start(test_config(), &standard_fill()).await;
    let msg = query_message("uSeR.XiNgReN.hOsT.", RecordType::A, Some(1232), false);
    let (reply, _) = udp_exchange(server.addr, &msg).await;
    assert_eq!(reply.queries[0].name().to_ascii(), "uSeR.XiNgReN.hOsT.");
    assert_eq!(reply.answers.len(), 2);
    for r in &reply.answers {
        assert_eq!(r.name.to_ascii(), "uSeR.XiNgReN.hOsT.");
    }
    server.stop().await;
}

#[tokio::test]
async fn registration_changes_show_on_the_next_query() {
    let mut fill = standard_fill();
    let server = start(test_config(), &fill).await;
    let ask = |name: &'static str| {
        let addr = server.addr;
        async move {
            let msg = query_message(name, RecordType::A, None, false);
            udp_exchange(addr, &msg).await.0
        }
    };
    assert_eq!(
        ask("pay.xingren.host.").await.metadata.response_code,
        ResponseCode::NXDomain
    );

    fill.put(&instance("pay", "p1", "10.0.5.1", 443));
    server.catalog.publish(&mut fill.state);
    eventually("pay appears", || async {
        addrs(&ask("pay.xingren.host.").await.answers) == ips(&["10.0.5.1"])
    })
    .await;

    fill.delete("user", "u1");
    server.catalog.publish(&mut fill.state);
    eventually("u1 leaves", || async {
        addrs(&ask("user.xingren.host.").await.answers) == ips(&["10.0.0.2"])
    })
    .await;
    let serial = |m: Message| match &m.answers[0].data {
        RData::SOA(s) => s.serial,
        _ => panic!(),
    };
    let soa = udp_exchange(
        server.addr,
        &query_message("xingren.host.", RecordType::SOA, None, false),
    )
    .await
    .0;
    assert_eq!(i64::from(serial(soa)), server.catalog.snapshot().revision);
    server.stop().await;
}

/// Service `big`: 200 instances, too many for any UDP answer.
fn big_fill() -> Fill {
    let mut fill = Fill::default();
    for i in 0..200u16 {
        fill.put(&instance(
            "big",
            &format!("i{i}"),
            &format!("10.2.{}.{}", i / 200, i % 200 + 1),
            80,
        ));
    }
    fill
}

#[tokio::test]
async fn udp_answers_are_whole_or_tc_and_tcp_gets_them() {
    let mut fill = big_fill();
    for i in 0..50u16 {
        fill.put(&instance(
            "mid",
            &format!("m{i}"),
            &format!("10.3.0.{}", i + 1),
            80,
        ));
    }
    let server = start(test_config(), &fill).await;

    // 200 addresses fit in no UDP answer: TC and no partial set, with or
    // without EDNS (RFC 2181 §9), so the client asks again over TCP.
    for edns in [None, Some(4096)] {
        let (reply, len) = udp_exchange(
            server.addr,
            &query_message("big.xingren.host.", RecordType::A, edns, false),
        )
        .await;
        assert!(len <= 1232, "{len}");
        assert!(reply.metadata.truncation, "edns {edns:?}");
        assert!(
            reply.answers.is_empty(),
            "edns {edns:?}: {}",
            reply.answers.len()
        );
    }
    let (srv, _) = udp_exchange(
        server.addr,
        &query_message("big.xingren.host.", RecordType::SRV, None, false),
    )
    .await;
    assert!(srv.metadata.truncation && srv.answers.is_empty());

    // 50 addresses: over 512 bytes, under the 1232 of EDNS.
    let (plain, _) = udp_exchange(
        server.addr,
        &query_message("mid.xingren.host.", RecordType::A, None, false),
    )
    .await;
    assert!(plain.metadata.truncation && plain.answers.is_empty());
    let (edns, len) = udp_exchange(
        server.addr,
        &query_message("mid.xingren.host.", RecordType::A, Some(4096), false),
    )
    .await;
    assert!(len <= 1232, "{len}");
    assert!(!edns.metadata.truncation);
    assert_eq!(edns.answers.len(), 50);
    assert_eq!(edns.edns.as_ref().map(|e| e.max_payload()), Some(1232));

    let all = tcp_exchange(
        server.addr,
        &query_message("big.xingren.host.", RecordType::A, None, false),
    )
    .await;
    assert_eq!(all.answers.len(), 200);
    let all_srv = tcp_exchange(
        server.addr,
        &query_message("big.xingren.host.", RecordType::SRV, None, false),
    )
    .await;
    assert_eq!(all_srv.answers.len(), 200);
    assert_eq!(all_srv.additionals.len(), 200);
    server.stop().await;
}

#[tokio::test]
async fn a_service_of_ten_thousand_answers_tcp_with_what_fits_by_weight() {
    let mut fill = Fill::default();
    for i in 0..10_000u32 {
        let mut inst = instance(
            "huge",
            &format!("i{i}"),
            &format!("10.{}.{}.{}", 100 + i / 62_500, i / 250 % 250, i % 250 + 1),
            80,
        );
        // Half the instances weigh 1, half 1000.
        inst.weight = if i % 2 == 0 { 1 } else { 1000 };
        fill.put(&inst);
    }
    let server = start(test_config(), &fill).await;

    // 10,000 A records do not fit in one 64 KiB message: as many as fit
    // (about 2,000 as hickory's encoder, which TCP answers go through,
    // writes them), no TC, and the heavy half is most of them.
    let a = tcp_exchange(
        server.addr,
        &query_message("huge.xingren.host.", RecordType::A, None, false),
    )
    .await;
    assert!(!a.metadata.truncation);
    let n = a.answers.len();
    assert!(n > 1_500 && n < 10_000, "{n} answers");
    assert!(a.to_vec().unwrap().len() <= usize::from(u16::MAX));
    let heavy = a
        .answers
        .iter()
        .filter(|r| match &r.data {
            RData::A(ip) => ip.octets()[3] % 2 == 0,
            _ => false,
        })
        .count();
    // Odd i (weight 1000) have even last octets (i % 250 + 1).
    assert!(heavy * 10 > n * 9, "{heavy} of {n} heavy");

    // SRV: answers first (they fill the message), then the addresses of
    // answered targets only, in the answers' order, as far as room is left.
    let srv = tcp_exchange(
        server.addr,
        &query_message("huge.xingren.host.", RecordType::SRV, None, false),
    )
    .await;
    assert!(!srv.metadata.truncation);
    assert!(srv.answers.len() > 1_000, "{}", srv.answers.len());
    let targets: Vec<Name> = srv
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => s.target.clone(),
            other => panic!("not SRV: {other:?}"),
        })
        .collect();
    let glue: Vec<&Record> = srv
        .additionals
        .iter()
        .filter(|r| r.record_type() != RecordType::OPT)
        .collect();
    assert!(glue.len() <= targets.len());
    for (g, target) in glue.iter().zip(&targets) {
        assert_eq!(&g.name, target);
    }

    // Over UDP: TC, no partial set.
    let (udp, len) = udp_exchange(
        server.addr,
        &query_message("huge.xingren.host.", RecordType::A, None, false),
    )
    .await;
    assert!(len <= 512, "{len}");
    assert!(udp.metadata.truncation && udp.answers.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn answers_are_shuffled_per_response() {
    let mut fill = Fill::default();
    for i in 1..=8u8 {
        fill.put(&instance(
            "mix",
            &format!("m{i}"),
            &format!("10.3.0.{i}"),
            80,
        ));
    }
    let server = start(test_config(), &fill).await;
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (reply, _) = udp_exchange(
            server.addr,
            &query_message("mix.xingren.host.", RecordType::A, None, false),
        )
        .await;
        assert_eq!(reply.answers.len(), 8);
        firsts.insert(reply.answers[0].data.to_string());
    }
    // 40 uniform draws over 8 addresses leave fewer than 4 distinct first
    // records with probability below 1e-20.
    assert!(firsts.len() >= 4, "{firsts:?}");
    server.stop().await;
}

#[tokio::test]
async fn unsupported_requests_get_their_error_codes() {
    let server = start(test_config(), &standard_fill()).await;

    let mut notify = query_message("xingren.host.", RecordType::SOA, None, false);
    notify.metadata.op_code = OpCode::Notify;
    assert_eq!(
        udp_exchange(server.addr, &notify)
            .await
            .0
            .metadata
            .response_code,
        ResponseCode::NotImp
    );

    let mut two = query_message("user.xingren.host.", RecordType::A, None, false);
    two.add_query(Query::query(
        Name::from_ascii("order.xingren.host.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        udp_exchange(server.addr, &two)
            .await
            .0
            .metadata
            .response_code,
        ResponseCode::FormErr
    );

    let mut v1 = query_message("user.xingren.host.", RecordType::A, Some(1232), false);
    if let Some(edns) = v1.edns.as_mut() {
        edns.set_version(1);
    }
    // BADVERS is 16, which hickory decodes by its other name, BADSIG.
    let badvers = udp_exchange(server.addr, &v1).await.0;
    assert_eq!(
        u16::from(badvers.metadata.response_code),
        u16::from(ResponseCode::BADVERS)
    );
    assert!(badvers.edns.is_some(), "an extended rcode needs OPT");

    let axfr = query_message("xingren.host.", RecordType::AXFR, None, false);
    assert_eq!(
        tcp_exchange(server.addr, &axfr)
            .await
            .metadata
            .response_code,
        ResponseCode::Refused
    );

    let mut chaos = query_message("version.bind.", RecordType::TXT, None, false);
    chaos.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(
        udp_exchange(server.addr, &chaos)
            .await
            .0
            .metadata
            .response_code,
        ResponseCode::Refused
    );

    // A response sent to the server is ignored (no reflection).
    let mut response = query_message("user.xingren.host.", RecordType::A, None, false);
    response.metadata.message_type = MessageType::Response;
    let silent = udp_exchange_raw(
        server.addr,
        &response.to_vec().unwrap(),
        Duration::from_millis(300),
    )
    .await;
    assert!(silent.is_none());
    server.stop().await;
}

#[tokio::test]
async fn a_taken_port_is_a_clear_error() {
    let first = start(test_config(), &Fill::default()).await;
    let catalog = signpost_control_plane::catalog::Catalog::new(Default::default());
    let config = signpost_dns::DnsConfig {
        listen: first.addr,
        ..test_config()
    };
    let err = signpost_dns::DnsServer::new(config, catalog).unwrap_err();
    assert!(
        matches!(err, signpost_dns::DnsError::AddrInUse { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("already in use"), "{err}");
    first.stop().await;
}

fn dig(server: std::net::SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tries=1", "+time=3"])
        .args(args)
        .output();
    let out = match out {
        Ok(out) => out,
        Err(err) => panic!(
            "cannot run `dig` ({err}): these tests need bind9's dig (Debian/Ubuntu: apt-get install bind9-dnsutils)"
        ),
    };
    assert!(
        out.status.success(),
        "dig {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_sees_the_table() {
    let server = start(test_config(), &standard_fill()).await;
    let addr = server.addr;
    let run = move |args: Vec<&'static str>| tokio::task::spawn_blocking(move || dig(addr, &args));

    let mut a: Vec<String> = run(vec!["+short", "user.xingren.host", "A"])
        .await
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    a.sort();
    assert_eq!(a, vec!["10.0.0.1", "10.0.0.2"]);

    let srv = run(vec!["+short", "_http._tcp.user.xingren.host", "SRV"])
        .await
        .unwrap();
    assert_eq!(srv.trim(), "10 100 8081 u1.user.xingren.host.");

    let tcp = run(vec!["+tcp", "+short", "u1.user.xingren.host", "TXT"])
        .await
        .unwrap();
    assert_eq!(tcp.trim(), "\"version=1.2.3\"");

    let ptr = run(vec!["+short", "-x", "10.0.0.1"]).await.unwrap();
    assert_eq!(ptr.trim(), "u1.user.xingren.host.");

    let nx = run(vec!["nobody.xingren.host", "A"]).await.unwrap();
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(nx.contains("flags: qr aa"), "{nx}");
    assert!(nx.contains("AUTHORITY: 1"), "{nx}");

    let soa = run(vec!["+short", "xingren.host", "SOA"]).await.unwrap();
    assert!(
        soa.starts_with("ns.xingren.host. hostmaster.xingren.host. "),
        "{soa}"
    );
    server.stop().await;
}

/// A burst of queries sent without waiting: the receive loop takes them in
/// batches and answers every one, each with its own id and answer.
#[tokio::test]
async fn a_burst_of_queries_is_answered_query_by_query() {
    let server = start(test_config(), &standard_fill()).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let names = [
        ("user.xingren.host.", RecordType::A, 2),
        ("order.xingren.host.", RecordType::A, 1),
        ("user.xingren.host.", RecordType::SRV, 3),
        ("nobody.xingren.host.", RecordType::A, 0),
    ];
    // Few enough that the replies fit the client socket's default buffer.
    let count = 100u16;
    for id in 0..count {
        let (name, qtype, _) = names[usize::from(id) % names.len()];
        let mut msg = query_message(name, qtype, Some(1232), false);
        msg.metadata.id = id;
        socket
            .send_to(&msg.to_vec().unwrap(), server.addr)
            .await
            .unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut buf = vec![0u8; 2048];
    while seen.len() < usize::from(count) {
        let (n, _) = tokio::time::timeout(STEP, socket.recv_from(&mut buf))
            .await
            .expect("every query answered within 5 s")
            .unwrap();
        let reply = Message::from_vec(&buf[..n]).unwrap();
        let id = reply.metadata.id;
        let (name, qtype, answers) = names[usize::from(id) % names.len()];
        assert_eq!(reply.queries[0].name().to_ascii(), name, "id {id}");
        assert_eq!(reply.queries[0].query_type(), qtype, "id {id}");
        assert_eq!(reply.answers.len(), answers, "id {id}");
        assert!(seen.insert(id), "id {id} answered twice");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_udp_answer_limit_answers_a_weighted_subset_without_tc() {
    let fill = big_fill();
    let config = signpost_dns::DnsConfig {
        udp_answer_limit: Some(3),
        ..test_config()
    };
    let server = start(config, &fill).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (reply, _) = udp_exchange(
            server.addr,
            &query_message("big.xingren.host.", RecordType::A, None, false),
        )
        .await;
        assert!(!reply.metadata.truncation);
        assert_eq!(reply.answers.len(), 3);
        seen.extend(reply.answers.iter().map(|r| r.data.to_string()));
    }
    // A different draw each time: 20 answers of 3 cover far more than 3.
    assert!(seen.len() > 20, "{} addresses seen", seen.len());
    // TCP is not limited.
    let all = tcp_exchange(
        server.addr,
        &query_message("big.xingren.host.", RecordType::A, None, false),
    )
    .await;
    assert_eq!(all.answers.len(), 200);
    server.stop().await;
}
