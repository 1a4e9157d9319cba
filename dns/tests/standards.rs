//! Standards details checked with real queries against a running server:
//! flags (RFC 3225 DO, Knot's flags on NOTIMP and FORMERR), replica
//! identity (NSID, CHAOS), DNS-SD browsing (RFC 6763) and the bound on
//! forwarded queries.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

/// `dig` against `server`, its output.
fn dig(server: std::net::SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tries=1", "+time=3"])
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run `dig` ({err}): apt-get install bind9-dnsutils"));
    assert!(
        out.status.success(),
        "dig {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn dig_async(server: std::net::SocketAddr, args: &[&'static str]) -> String {
    let args = args.to_vec();
    tokio::task::spawn_blocking(move || dig(server, &args))
        .await
        .unwrap()
}

/// The `flags:` of dig's header line and of its OPT line.
fn dig_flags(out: &str) -> (String, String) {
    let header = out
        .lines()
        .find(|l| l.starts_with(";; flags:"))
        .and_then(|l| l.split("flags:").nth(1))
        .map(|l| l.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let opt = out
        .lines()
        .find(|l| l.starts_with("; EDNS:"))
        .and_then(|l| l.split("flags:").nth(1))
        .map(|l| l.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    (header, opt)
}

fn with_do(mut msg: Message) -> Message {
    if let Some(edns) = msg.edns.as_mut() {
        edns.set_dnssec_ok(true);
    }
    msg
}

/// A config whose clients may recurse (an upstream that never answers), so
/// that RA is set on ordinary answers.
fn recursing_config() -> signpost_dns::DnsConfig {
    signpost_dns::DnsConfig {
        upstreams: vec!["127.0.0.1:9".parse().unwrap()],
        forward_timeout: Duration::from_millis(300),
        ..test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_bit_is_echoed_over_udp_and_tcp_on_both_paths() {
    let server = start(recursing_config(), &standard_fill()).await;
    // A/SRV take the fast path over UDP; ANY and a CD query with an NSID
    // option do not; TCP is hickory's.
    for (name, qtype) in [
        ("user.xingren.host.", RecordType::A),
        ("user.xingren.host.", RecordType::SRV),
        ("nobody.xingren.host.", RecordType::A),
        ("user.xingren.host.", RecordType::ANY),
    ] {
        for dnssec in [false, true] {
            let mut q = query_message(name, qtype, Some(1232), false);
            if dnssec {
                q = with_do(q);
            }
            let (udp, _) = udp_exchange(server.addr, &q).await;
            let tcp = tcp_exchange(server.addr, &q).await;
            for (proto, reply) in [("udp", &udp), ("tcp", &tcp)] {
                let edns = reply.edns.as_ref().expect("EDNS answered with EDNS");
                assert_eq!(edns.flags().dnssec_ok, dnssec, "{name} {qtype} {proto}");
            }
        }
    }
    // Without EDNS there is no OPT to carry it.
    let (plain, _) = udp_exchange(
        server.addr,
        &query_message("user.xingren.host.", RecordType::A, None, false),
    )
    .await;
    assert!(plain.edns.is_none());

    let out = dig_async(server.addr, &["+dnssec", "user.xingren.host", "A"]).await;
    assert_eq!(dig_flags(&out).1, "do", "{out}");
    let out = dig_async(
        server.addr,
        &["+dnssec", "+tcp", "user.xingren.host", "SRV"],
    )
    .await;
    assert_eq!(dig_flags(&out).1, "do", "{out}");
    let out = dig_async(server.addr, &["user.xingren.host", "A"]).await;
    assert_eq!(dig_flags(&out).1, "", "{out}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notimp_and_formerr_carry_qr_rd_only_like_knot() {
    let server = start(recursing_config(), &standard_fill()).await;
    let check = |what: &str, reply: &Message, rcode: ResponseCode| {
        let m = &reply.metadata;
        assert_eq!(m.response_code, rcode, "{what}");
        assert!(m.recursion_desired, "{what}: RD echoed");
        assert!(!m.recursion_available, "{what}: no RA");
        assert!(!m.checking_disabled, "{what}: no CD");
        assert!(!m.authoritative, "{what}: no AA");
    };
    for op in [OpCode::Status, OpCode::Notify, OpCode::Update] {
        let mut q = query_message("xingren.host.", RecordType::SOA, None, true);
        q.metadata.op_code = op;
        q.metadata.checking_disabled = true;
        let (udp, _) = udp_exchange(server.addr, &q).await;
        check(&format!("{op:?} udp"), &udp, ResponseCode::NotImp);
        let tcp = tcp_exchange(server.addr, &q).await;
        check(&format!("{op:?} tcp"), &tcp, ResponseCode::NotImp);
    }
    // Two questions: FORMERR (RFC 9619).
    let mut two = query_message("user.xingren.host.", RecordType::A, None, true);
    two.metadata.checking_disabled = true;
    two.add_query(Query::query(
        Name::from_ascii("order.xingren.host.").unwrap(),
        RecordType::A,
    ));
    let (udp, _) = udp_exchange(server.addr, &two).await;
    check("two questions udp", &udp, ResponseCode::FormErr);
    let tcp = tcp_exchange(server.addr, &two).await;
    check("two questions tcp", &tcp, ResponseCode::FormErr);
    // A question that does not decode (a label running past the end),
    // answered by the UDP loop itself.
    let mut bad = query_message("user.xingren.host.", RecordType::A, None, true)
        .to_vec()
        .unwrap();
    bad[3] |= 0x10; // CD
    bad.truncate(16);
    let reply = udp_exchange_raw(server.addr, &bad, STEP)
        .await
        .expect("FORMERR");
    let reply = Message::from_vec(&reply).unwrap();
    check("undecodable udp", &reply, ResponseCode::FormErr);
    // An ordinary answer still says RA for this client, and echoes CD.
    let mut q = query_message("user.xingren.host.", RecordType::A, None, true);
    q.metadata.checking_disabled = true;
    let (ok, _) = udp_exchange(server.addr, &q).await;
    assert!(ok.metadata.recursion_available && ok.metadata.checking_disabled);

    let out = dig_async(
        server.addr,
        &["+opcode=status", "+cd", "xingren.host", "SOA"],
    )
    .await;
    assert!(out.contains("status: NOTIMP"), "{out}");
    assert_eq!(dig_flags(&out).0, "qr rd", "{out}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nsid_and_chaos_names_tell_the_replica() {
    use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption, NSIDPayload};
    use hickory_proto::rr::{DNSClass, RData};

    let config = signpost_dns::DnsConfig {
        nsid: Some("dns-replica-7".into()),
        ..test_config()
    };
    let server = start(config, &standard_fill()).await;

    // NSID asked (empty option) over UDP and TCP: the id comes back; not
    // asked: no option.
    for ask in [false, true] {
        let mut q = query_message("user.xingren.host.", RecordType::A, Some(1232), false);
        if ask {
            let edns = q.edns.as_mut().unwrap();
            edns.options_mut()
                .insert(EdnsOption::NSID(NSIDPayload::new(Vec::new()).unwrap()));
        }
        let (udp, _) = udp_exchange(server.addr, &q).await;
        let tcp = tcp_exchange(server.addr, &q).await;
        for reply in [udp, tcp] {
            assert_eq!(reply.answers.len(), 2, "the answer is still there");
            let nsid = reply.edns.as_ref().unwrap().options().get(EdnsCode::NSID);
            match (ask, nsid) {
                (true, Some(EdnsOption::NSID(p))) => assert_eq!(p.as_ref(), b"dns-replica-7"),
                (false, None) => {}
                other => panic!("ask {ask}: {other:?}"),
            }
        }
    }

    // CHAOS TXT, with hickory's encoding and with dig.
    for name in ["id.server.", "hostname.bind.", "ID.SERVER."] {
        let mut q = query_message(name, RecordType::TXT, None, false);
        q.queries[0].set_query_class(DNSClass::CH);
        let (reply, _) = udp_exchange(server.addr, &q).await;
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert!(reply.metadata.authoritative, "{name}");
        assert_eq!(reply.answers.len(), 1, "{name}");
        assert_eq!(reply.answers[0].dns_class, DNSClass::CH);
        match &reply.answers[0].data {
            RData::TXT(txt) => assert_eq!(txt.to_string(), "dns-replica-7"),
            other => panic!("{other:?}"),
        }
    }
    let out = dig_async(server.addr, &["+short", "CH", "TXT", "id.server"]).await;
    assert_eq!(out.trim(), "\"dns-replica-7\"");
    let out = dig_async(server.addr, &["+nsid", "user.xingren.host", "A"]).await;
    assert!(
        out.contains("NSID: ") && out.contains("(\"dns-replica-7\")"),
        "{out}"
    );
    // No version unless configured.
    let out = dig_async(server.addr, &["CH", "TXT", "version.bind"]).await;
    assert!(out.contains("status: REFUSED"), "{out}");
    server.stop().await;

    let config = signpost_dns::DnsConfig {
        version_string: Some("signpost test".into()),
        ..test_config()
    };
    let server = start(config, &standard_fill()).await;
    let out = dig_async(server.addr, &["+short", "CH", "TXT", "version.bind"]).await;
    assert_eq!(out.trim(), "\"signpost test\"");
    // Without an id, id.server is refused.
    let out = dig_async(server.addr, &["CH", "TXT", "id.server"]).await;
    assert!(out.contains("status: REFUSED"), "{out}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_sd_browsing_follows_rfc_6763() {
    let server = start(test_config(), &standard_fill()).await;
    let short = |args: &'static [&'static str]| dig_async(server.addr, args);
    let lines = |out: String| -> Vec<String> {
        let mut v: Vec<String> = out.lines().map(str::to_string).collect();
        v.sort();
        v
    };
    assert_eq!(
        lines(short(&["+short", "_services._dns-sd._udp.xingren.host", "PTR"]).await),
        ["_order._tcp.xingren.host.", "_user._tcp.xingren.host."]
    );
    for args in [
        &["+short", "b._dns-sd._udp.xingren.host", "PTR"],
        &["+short", "lb._dns-sd._udp.xingren.host", "PTR"],
    ] {
        assert_eq!(lines(short(args).await), ["xingren.host."], "{args:?}");
    }
    // u3 is critical: not browsed.
    assert_eq!(
        lines(short(&["+short", "_user._tcp.xingren.host", "PTR"]).await),
        [
            "u1._user._tcp.xingren.host.",
            "u2._user._tcp.xingren.host.",
            "u6._user._tcp.xingren.host."
        ]
    );
    assert_eq!(
        lines(short(&["+short", "u1._user._tcp.xingren.host", "SRV"]).await),
        ["10 100 8080 u1.user.xingren.host."]
    );
    assert_eq!(
        lines(short(&["+short", "u1._user._tcp.xingren.host", "TXT"]).await),
        ["\"version=1.2.3\""]
    );
    assert_eq!(
        lines(short(&["+short", "u2._user._tcp.xingren.host", "TXT"]).await),
        ["\"\""]
    );
    // Over TCP too, with hickory's messages.
    let q = query_message("_user._tcp.xingren.host.", RecordType::PTR, None, false);
    assert_eq!(tcp_exchange(server.addr, &q).await.answers.len(), 3);
    let q = query_message("u3._user._tcp.xingren.host.", RecordType::SRV, None, false);
    let (reply, _) = udp_exchange(server.addr, &q).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    server.stop().await;
}
