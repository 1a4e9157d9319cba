//! The fast path against the hickory handler: for every row of the DNS
//! table in CONTRACT.md, with and without EDNS, in any case, with RD and CD
//! set or not, both must give the same response code, flags, question and
//! record sets (the order of records is shuffled per response by both). Then
//! hostile packets: the fast reader never crashes or loops, and whatever it
//! answers, hickory answers the same way.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Context, Parsed, Scratch, parse, respond};
use crate::forward::Forwarder;
use crate::handler::{Handler, Shared};
use crate::hostile_tests::{Capture, mutate, nasties, seeds};
use crate::index::{Index, ZoneConfig};
use crate::metrics::Metrics;
use crate::name::key_of;
use crate::table_tests::{instance, table_instances};
use crate::testing::{Fill, fill_with};

const ZONE: &str = "xingren.host.";

fn zone() -> ZoneConfig {
    ZoneConfig {
        origin: Name::from_ascii(ZONE).unwrap(),
        ttl: Duration::from_secs(5),
        negative_ttl: Duration::from_secs(5),
        ns_address: Some("192.0.2.53".parse().unwrap()),
    }
}

/// The catalog of the table tests ([`table_instances`], u3 critical), plus
/// `big` (200 instances) and `fat` (one instance whose TXT fits in no UDP
/// answer).
fn catalog() -> Fill {
    let mut c = fill_with(&table_instances());
    for i in 0..200u16 {
        let mut inst = instance(
            "big",
            &format!("i{i}"),
            &format!("10.2.{}.{}", i / 200, i % 200 + 1),
            80,
        );
        inst.weight = 1 + i;
        c.put(&inst);
    }
    let mut fat = instance("fat", "f1", "10.0.3.1", 80);
    for i in 0..6 {
        fat.meta
            .insert(format!("k{i}").into(), "x".repeat(200).into());
    }
    c.put(&fat);
    c
}

fn shared(forwarder: Option<Forwarder>) -> Arc<Shared> {
    shared_with(forwarder, None)
}

/// [`shared`] with `--udp-answer-limit`.
fn shared_with(forwarder: Option<Forwarder>, udp_answer_limit: Option<u16>) -> Arc<Shared> {
    let zone = zone();
    let index = Index::build(&catalog().snapshot(), &zone);
    Arc::new(Shared {
        index: ArcSwap::from_pointee(index),
        zone,
        allow_recursion: crate::config::default_allow_recursion(),
        forwarder,
        metrics: Metrics::default(),
        max_udp_payload: 1232,
        udp_answer_limit,
        allow_query: None,
        identity: Default::default(),
        transfers: crate::transfer::Transfers::new(Vec::new()),
    })
}

const CLIENT: &str = "127.0.0.1:5300";

/// The fast path's response to `packet`, or `None` if it leaves it to
/// hickory (or drops it).
fn fast(shared: &Shared, packet: &[u8], rng: &mut SmallRng) -> Option<Vec<u8>> {
    let origin = &shared.zone.origin;
    let Parsed::Fast(q) = parse(packet, &key_of(origin), usize::from(origin.num_labels())) else {
        return None;
    };
    let cx = Context {
        max_udp_payload: shared.max_udp_payload,
        recursion: shared.may_recurse(CLIENT.parse::<std::net::SocketAddr>().unwrap().ip()),
        answer_limit: shared.udp_answer_limit,
    };
    let mut out = Vec::new();
    let index = shared.index.load();
    respond(
        packet,
        &q,
        &index,
        cx,
        rng,
        &mut Scratch::default(),
        &mut out,
    )?;
    Some(out)
}

/// The hickory handler's response to `packet` over UDP, or `None` if
/// hickory's server would not call the handler.
async fn slow(shared: &Arc<Shared>, packet: &[u8]) -> Option<Vec<u8>> {
    let request =
        Request::from_bytes(packet.to_vec(), CLIENT.parse().unwrap(), Protocol::Udp).ok()?;
    if request.metadata.message_type == MessageType::Response {
        return None;
    }
    let capture = Capture {
        udp: true,
        sent: Arc::default(),
    };
    Handler(shared.clone())
        .handle_request::<_, TokioTime>(&request, capture.clone())
        .await;
    let sent = capture.sent.lock().unwrap();
    sent.first().cloned()
}

fn section(records: &[Record]) -> Vec<String> {
    let mut v: Vec<String> = records.iter().map(|r| r.to_string()).collect();
    v.sort();
    v
}

/// The limit a UDP response to `packet` must fit in.
fn limit_of(query: &Message) -> usize {
    query
        .edns
        .as_ref()
        .map_or(512, |e| e.max_payload().clamp(512, 1232))
        .into()
}

/// Asserts that the two responses say the same, modulo record order.
fn assert_same(what: &str, query: &[u8], fast: &[u8], slow: &[u8]) {
    let q = Message::from_vec(query).unwrap();
    let f = Message::from_vec(fast).unwrap_or_else(|e| panic!("{what}: fast reply: {e}"));
    let s = Message::from_vec(slow).unwrap();
    assert!(fast.len() <= limit_of(&q), "{what}: {} bytes", fast.len());
    assert_eq!(f.metadata, s.metadata, "{what}: header");
    let names = |m: &Message| -> Vec<String> {
        m.queries
            .iter()
            .map(|q| {
                format!(
                    "{} {} {}",
                    q.name().to_ascii(),
                    q.query_type(),
                    q.query_class()
                )
            })
            .collect()
    };
    assert_eq!(names(&f), names(&s), "{what}: question");
    assert_eq!(section(&f.answers), section(&s.answers), "{what}: answers");
    assert_eq!(
        section(&f.authorities),
        section(&s.authorities),
        "{what}: authorities"
    );
    assert_eq!(
        section(&f.additionals),
        section(&s.additionals),
        "{what}: additionals"
    );
    assert_eq!(
        f.edns
            .as_ref()
            .map(|e| (e.max_payload(), e.version(), e.flags().dnssec_ok)),
        s.edns
            .as_ref()
            .map(|e| (e.max_payload(), e.version(), e.flags().dnssec_ok)),
        "{what}: OPT"
    );
}

fn query(name: &str, qtype: RecordType, edns: Option<u16>, rd: bool, cd: bool) -> Vec<u8> {
    query_do(name, qtype, edns, (rd, cd, false))
}

/// [`query`] with the DO bit too, when there is an OPT record.
fn query_do(
    name: &str,
    qtype: RecordType,
    edns: Option<u16>,
    (rd, cd, dnssec_ok): (bool, bool, bool),
) -> Vec<u8> {
    let mut msg = Message::new(0x4242, MessageType::Query, OpCode::Query);
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    msg.metadata.recursion_desired = rd;
    msg.metadata.checking_disabled = cd;
    if let Some(payload) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        e.set_dnssec_ok(dnssec_ok);
        msg.edns = Some(e);
    }
    msg.to_vec().unwrap()
}

/// Every row of the table (and the negative ones), as (name, type).
const ROWS: &[(&str, RecordType)] = &[
    ("user.xingren.host.", RecordType::A),
    ("user.xingren.host.", RecordType::AAAA),
    ("user.xingren.host.", RecordType::SRV),
    ("_http._tcp.user.xingren.host.", RecordType::SRV),
    ("_http._udp.user.xingren.host.", RecordType::SRV),
    ("u1.user.xingren.host.", RecordType::A),
    ("u1.user.xingren.host.", RecordType::TXT),
    ("u6.user.xingren.host.", RecordType::AAAA),
    ("u3.user.xingren.host.", RecordType::A),
    ("v2.tag.user.xingren.host.", RecordType::A),
    ("v2.tag.user.xingren.host.", RecordType::AAAA),
    ("v2.tag.user.xingren.host.", RecordType::SRV),
    ("old.tag.user.xingren.host.", RecordType::A),
    ("_services._dns-sd._udp.xingren.host.", RecordType::PTR),
    ("b._dns-sd._udp.xingren.host.", RecordType::PTR),
    ("lb._dns-sd._udp.xingren.host.", RecordType::PTR),
    ("_user._tcp.xingren.host.", RecordType::PTR),
    ("u1._user._tcp.xingren.host.", RecordType::SRV),
    ("u1._user._tcp.xingren.host.", RecordType::TXT),
    ("u2._user._tcp.xingren.host.", RecordType::TXT),
    ("u3._user._tcp.xingren.host.", RecordType::SRV),
    ("_tcp.xingren.host.", RecordType::PTR),
    ("1.0.0.10.in-addr.arpa.", RecordType::PTR),
    (
        "6.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.",
        RecordType::PTR,
    ),
    ("xingren.host.", RecordType::SOA),
    ("xingren.host.", RecordType::NS),
    ("xingren.host.", RecordType::A),
    ("ns.xingren.host.", RecordType::A),
    ("nobody.xingren.host.", RecordType::A),
    ("deep.nobody.xingren.host.", RecordType::SRV),
    ("order.xingren.host.", RecordType::TXT),
    ("order.xingren.host.", RecordType::MX),
    ("tag.user.xingren.host.", RecordType::A),
    ("_tcp.user.xingren.host.", RecordType::SRV),
    ("example.com.", RecordType::A),
    ("1.0.0.10.in-addr.arpa.", RecordType::A),
    ("9.9.9.10.in-addr.arpa.", RecordType::PTR),
    (".", RecordType::NS),
    ("big.xingren.host.", RecordType::A),
    ("big.xingren.host.", RecordType::SRV),
    ("i7.big.xingren.host.", RecordType::A),
    ("f1.fat.xingren.host.", RecordType::TXT),
];

/// Spellings of a name: as written, upper case, mixed (0x20).
fn spellings(name: &str) -> Vec<String> {
    let mixed: String = name
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    vec![name.to_string(), name.to_ascii_uppercase(), mixed]
}

#[tokio::test]
async fn fast_path_answers_every_row_like_the_handler() {
    for limit in [None, Some(5)] {
        let shared = shared_with(None, limit);
        let mut rng = SmallRng::seed_from_u64(7);
        for &(name, qtype) in ROWS {
            for spelled in spellings(name) {
                for edns in [None, Some(100), Some(512), Some(1232), Some(4096)] {
                    for (rd, cd, dnssec_ok) in [
                        (false, false, false),
                        (true, false, true),
                        (false, true, false),
                        (false, true, true),
                    ] {
                        let what = format!(
                            "{spelled} {qtype} edns {edns:?} rd {rd} cd {cd} do {dnssec_ok} limit {limit:?}"
                        );
                        let packet = query_do(&spelled, qtype, edns, (rd, cd, dnssec_ok));
                        let f = fast(&shared, &packet, &mut rng)
                            .unwrap_or_else(|| panic!("{what}: not answered by the fast path"));
                        let s = slow(&shared, &packet).await.unwrap();
                        // By the DNS rules `big` does not fit and both say
                        // TC with no answer; a small service fits whole.
                        if limit.is_none() || !name.starts_with("big.") {
                            assert_same(&what, &packet, &f, &s);
                            continue;
                        }
                        // Under the limit: a weighted draw of 5 each, so
                        // compare what can be: header, counts, glue.
                        let (fm, sm) = (
                            Message::from_vec(&f).unwrap(),
                            Message::from_vec(&s).unwrap(),
                        );
                        assert!(
                            f.len() <= limit_of(&Message::from_vec(&packet).unwrap()),
                            "{what}"
                        );
                        assert_eq!(fm.metadata, sm.metadata, "{what}");
                        assert_eq!(fm.answers.len(), 5, "{what}");
                        assert_eq!(sm.answers.len(), 5, "{what}");
                        assert_eq!(fm.additionals.len(), sm.additionals.len(), "{what}");
                        // Glue only for kept answers.
                        for glue in &fm.additionals {
                            if glue.record_type() == RecordType::OPT {
                                continue;
                            }
                            assert!(
                                fm.answers
                                    .iter()
                                    .any(|a| a.data.to_string().ends_with(&glue.name.to_string())),
                                "{what}: stray glue {glue}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn fast_path_refuses_like_the_handler_and_leaves_forwarding_to_it() {
    let forwarder = Forwarder::new(
        &["127.0.0.1:9".parse().unwrap()],
        Duration::from_millis(100),
        crate::DEFAULT_MAX_FORWARDS,
    )
    .unwrap();
    let shared = shared(Some(forwarder));
    let mut rng = SmallRng::seed_from_u64(8);
    // RA is set for this client now; a zone answer says so too.
    for (name, qtype) in [
        ("user.xingren.host.", RecordType::A),
        ("nobody.xingren.host.", RecordType::A),
        ("example.com.", RecordType::A),
    ] {
        let packet = query(name, qtype, Some(1232), false, false);
        let f = fast(&shared, &packet, &mut rng).unwrap();
        let s = slow(&shared, &packet).await.unwrap();
        assert_same(name, &packet, &f, &s);
        assert!(Message::from_vec(&f).unwrap().metadata.recursion_available);
    }
    // With RD, a name outside the zone is forwarded: hickory's job.
    let packet = query("example.com.", RecordType::A, None, true, false);
    assert!(fast(&shared, &packet, &mut rng).is_none());
}

#[tokio::test]
async fn fast_path_shuffles_by_weight() {
    // u1 has weight 300, u2 100: u1 comes first about 3 times in 4.
    let shared = shared(None);
    let mut rng = SmallRng::seed_from_u64(9);
    let packet = query("user.xingren.host.", RecordType::A, None, false, false);
    let mut u1_first = 0;
    for _ in 0..4000 {
        let reply = Message::from_vec(&fast(&shared, &packet, &mut rng).unwrap()).unwrap();
        if reply.answers[0].data.to_string() == "10.0.0.1" {
            u1_first += 1;
        }
    }
    let share = f64::from(u1_first) / 4000.0;
    assert!((share - 0.75).abs() < 0.03, "{share}");
}

/// Runs a packet through both paths; whatever the fast path answers must
/// decode, fit, and say what hickory says.
async fn differential(shared: &Arc<Shared>, packet: &[u8], rng: &mut SmallRng) -> bool {
    let Some(f) = fast(shared, packet, rng) else {
        return false;
    };
    let reply = Message::from_vec(&f).expect("fast reply decodes");
    assert_eq!(
        reply.metadata.id,
        u16::from_be_bytes([packet[0], packet[1]])
    );
    let s = slow(shared, packet)
        .await
        .unwrap_or_else(|| panic!("fast path answered what hickory would not: {packet:?}"));
    let sm = Message::from_vec(&s).unwrap();
    assert_eq!(reply.metadata, sm.metadata, "{packet:?}");
    if reply.answers.len() == sm.answers.len() && !reply.queries.is_empty() {
        let big = reply.queries[0]
            .name()
            .to_ascii()
            .to_ascii_lowercase()
            .starts_with("big.");
        if !big {
            assert_same(&format!("{packet:?}"), packet, &f, &s);
        }
    }
    true
}

#[tokio::test]
async fn hostile_packets_never_break_the_fast_path() {
    let shared = shared(None);
    let mut rng = SmallRng::seed_from_u64(0xFA57);
    let mut answer_rng = SmallRng::seed_from_u64(1);
    for packet in nasties() {
        differential(&shared, &packet, &mut answer_rng).await;
    }
    let seeds = seeds();
    let mut answered = 0;
    for i in 0..20_000 {
        let packet: Vec<u8> = match i % 5 {
            0 => (0..rng.random_range(0..600))
                .map(|_| rng.random())
                .collect(),
            _ => mutate(&mut rng, &seeds[i % seeds.len()]),
        };
        if differential(&shared, &packet, &mut answer_rng).await {
            answered += 1;
        }
    }
    // The mutations must reach the answer code, not just the reader.
    assert!(answered > 2_000, "only {answered} packets answered");
}

/// A random query of the kind a resolver or a fuzzer sends: a name made of
/// the zone's own labels (so that it often hits), any type, random case,
/// flags, EDNS size and DO.
fn random_query(rng: &mut SmallRng) -> Vec<u8> {
    const LABELS: &[&str] = &[
        "user",
        "u1",
        "u2",
        "u3",
        "u6",
        "order",
        "o1",
        "big",
        "i7",
        "fat",
        "f1",
        "tag",
        "v2",
        "old",
        "_user",
        "_order",
        "_tcp",
        "_udp",
        "_http",
        "_dns-sd",
        "_services",
        "b",
        "lb",
        "ns",
        "in-addr",
        "arpa",
        "10",
        "0",
        "1",
        "nobody",
    ];
    const TYPES: &[RecordType] = &[
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::TXT,
        RecordType::PTR,
        RecordType::SOA,
        RecordType::NS,
        RecordType::ANY,
        RecordType::MX,
        RecordType::CAA,
    ];
    let mut labels: Vec<String> = (0..rng.random_range(0..5))
        .map(|_| LABELS[rng.random_range(0..LABELS.len())].to_string())
        .collect();
    match rng.random_range(0..10) {
        0 => {}
        1 => labels.push("example".into()),
        _ => labels.extend(["xingren".into(), "host".into()]),
    }
    let name: String = labels
        .iter()
        .map(|l| format!("{l}."))
        .collect::<String>()
        .chars()
        .map(|c| {
            if rng.random_bool(0.3) {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    let name = if name.is_empty() {
        ".".to_string()
    } else {
        name
    };
    let qtype = if rng.random_bool(0.05) {
        RecordType::from(rng.random::<u16>())
    } else {
        TYPES[rng.random_range(0..TYPES.len())]
    };
    let edns = rng.random_bool(0.6).then(|| rng.random_range(0..5000u16));
    let mut packet = query_do(
        &name,
        qtype,
        edns,
        (rng.random(), rng.random(), rng.random()),
    );
    // AD, and the Z bit that must be ignored.
    if rng.random_bool(0.1) {
        packet[3] |= 0x20;
    }
    if rng.random_bool(0.05) {
        packet[3] |= 0x40;
    }
    packet
}

/// Differential fuzzing, bounded in count and time: random well-formed
/// queries, then mutations of them, through the fast path and through
/// hickory's; whatever the fast path answers, hickory answers the same.
#[tokio::test]
async fn random_and_mutated_queries_agree_on_both_paths() {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for limit in [None, Some(3)] {
        let shared = shared_with(None, limit);
        let mut rng = SmallRng::seed_from_u64(0x5EED ^ u64::from(limit.unwrap_or(0)));
        let mut answer_rng = SmallRng::seed_from_u64(2);
        let (mut sent, mut answered) = (0, 0);
        while sent < 10_000 && std::time::Instant::now() < deadline {
            let query = random_query(&mut rng);
            let packet = if sent % 3 == 2 {
                mutate(&mut rng, &query)
            } else {
                query
            };
            sent += 1;
            if differential(&shared, &packet, &mut answer_rng).await {
                answered += 1;
            }
        }
        // The queries must reach the answer code, not just the reader.
        assert!(sent >= 1_000, "only {sent} queries within the time bound");
        assert!(
            answered * 2 > sent,
            "only {answered} of {sent} answered by the fast path"
        );
    }
}

#[test]
fn deep_and_looping_names_are_left_to_hickory() {
    let origin = Name::from_ascii(ZONE).unwrap();
    let zone = key_of(&origin);
    let header = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    // A pointer to itself, pointers to each other, past the end.
    for tail in [
        &[0xC0, 12, 0, 1, 0, 1][..],
        &[0xC0, 14, 0xC0, 12, 0, 1, 0, 1],
        &[0xC0, 0xFF, 0, 1, 0, 1],
    ] {
        let mut p = header.to_vec();
        p.extend_from_slice(tail);
        assert!(matches!(parse(&p, &zone, 2), Parsed::Hickory));
    }
    // 10 000 labels: refused at the 255-byte limit, after 128 of them.
    let mut p = header.to_vec();
    for _ in 0..10_000 {
        p.extend_from_slice(&[1, b'a']);
    }
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    assert!(matches!(parse(&p, &zone, 2), Parsed::Hickory));
    // Class CH and ANY go to hickory too.
    let mut msg = Message::new(1, MessageType::Query, OpCode::Query);
    let mut q = Query::query(Name::from_ascii("version.bind.").unwrap(), RecordType::TXT);
    q.set_query_class(DNSClass::CH);
    msg.add_query(q);
    assert!(matches!(
        parse(&msg.to_vec().unwrap(), &zone, 2),
        Parsed::Hickory
    ));
}
