//! Record building for every row of the DNS table in CONTRACT.md, name
//! handling, and fitting answers into UDP payloads: the index and the
//! response assembly, without sockets.

use std::collections::BTreeMap;
use std::iter;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecoder, BinEncodable, BinEncoder};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use signpost_control_plane::model::Instance;

use crate::index::{Index, ZoneConfig};
use crate::name::KeyBuf;
use crate::response::{Answer, Fit};
pub(crate) use crate::testing::{Fill, fill_with, instance, user_and_order_instances};

const ZONE: &str = "xingren.host.";

/// The `user`/`order` instances of [`crate::testing`] with more to tell
/// apart in the answer table: u1 also tagged `canary`, in zone `a`, of
/// weight 300; u2 tagged `v2` with port `http` 8082; u3 tagged `old`.
pub(crate) fn table_instances() -> [Instance; 5] {
    let mut insts = user_and_order_instances();
    let [u1, u2, u3, ..] = &mut insts;
    u1.tags.push("canary".into());
    u1.meta.insert("zone".into(), "a".into());
    u1.weight = 300;
    u2.tags = vec!["v2".into()];
    u2.ports.insert("http".into(), 8082);
    u3.tags = vec!["old".into()];
    insts
}

fn zone(ns: Option<&str>) -> ZoneConfig {
    ZoneConfig {
        origin: Name::from_ascii(ZONE).unwrap(),
        ttl: Duration::from_secs(5),
        negative_ttl: Duration::from_secs(5),
        ns_address: ns.map(|s| s.parse().unwrap()),
    }
}

/// The catalog most tests use: [`table_instances`], u3 critical.
fn fixture() -> Index {
    let mut c = fill_with(&table_instances());
    Index::build(&c.snapshot(), &zone(Some("192.0.2.53")))
}

fn ask(index: &Index, name: &str, qtype: RecordType) -> Option<Answer> {
    let qname = Name::from_ascii(name).unwrap();
    let key = KeyBuf::from_name(&qname).unwrap();
    let res = index.resolve(key.as_bytes(), qtype);
    let mut rng = SmallRng::seed_from_u64(1);
    Answer::from_index(&res, index, &qname, &mut rng)
}

fn answer(index: &Index, name: &str, qtype: RecordType) -> Answer {
    ask(index, name, qtype).unwrap_or_else(|| panic!("{name} {qtype} is not ours"))
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

fn addrs(records: &[Record]) -> Vec<IpAddr> {
    sorted(
        records
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect(),
    )
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    sorted(list.iter().map(|s| s.parse().unwrap()).collect())
}

fn srvs(records: &[Record]) -> Vec<(u16, u16, u16, String)> {
    sorted(
        records
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.priority, s.weight, s.port, s.target.to_ascii())),
                _ => None,
            })
            .collect(),
    )
}

fn assert_nodata(a: &Answer) {
    assert_eq!(a.rcode, ResponseCode::NoError);
    assert!(a.answers.is_empty(), "{:?}", a.answers);
    assert!(a.authoritative);
    assert_eq!(a.authorities.len(), 1);
    assert_eq!(a.authorities[0].record_type(), RecordType::SOA);
}

fn assert_nxdomain(a: &Answer) {
    assert_eq!(a.rcode, ResponseCode::NXDomain);
    assert!(a.answers.is_empty());
    assert!(a.authoritative);
    assert_eq!(a.authorities.len(), 1);
    assert_eq!(a.authorities[0].record_type(), RecordType::SOA);
}

#[test]
fn service_a_lists_healthy_addresses() {
    let index = fixture();
    let a = answer(&index, "user.xingren.host.", RecordType::A);
    assert_eq!(a.rcode, ResponseCode::NoError);
    assert!(a.authoritative);
    // u3 is critical: left out.
    assert_eq!(addrs(&a.answers), ips(&["10.0.0.1", "10.0.0.2"]));
    assert!(a.answers.iter().all(|r| r.ttl == 5));
    let aaaa = answer(&index, "user.xingren.host.", RecordType::AAAA);
    assert_eq!(addrs(&aaaa.answers), ips(&["fd00::6"]));
}

#[test]
fn service_srv_targets_instances_with_glue() {
    let index = fixture();
    let a = answer(&index, "user.xingren.host.", RecordType::SRV);
    assert_eq!(
        srvs(&a.answers),
        vec![
            (10, 100, 8080, "u2.user.xingren.host.".to_string()),
            (10, 100, 9090, "u6.user.xingren.host.".to_string()),
            (10, 300, 8080, "u1.user.xingren.host.".to_string()),
        ]
    );
    assert_eq!(
        addrs(&a.additionals),
        ips(&["10.0.0.1", "10.0.0.2", "fd00::6"])
    );
    let glue_names = sorted(a.additionals.iter().map(|r| r.name.to_ascii()).collect());
    assert_eq!(
        glue_names,
        vec![
            "u1.user.xingren.host.",
            "u2.user.xingren.host.",
            "u6.user.xingren.host."
        ]
    );
}

#[test]
fn named_ports_answer_srv_under_tcp_and_udp() {
    let index = fixture();
    for proto in ["_tcp", "_udp"] {
        let a = answer(
            &index,
            &format!("_http.{proto}.user.xingren.host."),
            RecordType::SRV,
        );
        assert_eq!(
            srvs(&a.answers),
            vec![
                (10, 100, 8082, "u2.user.xingren.host.".to_string()),
                (10, 300, 8081, "u1.user.xingren.host.".to_string()),
            ]
        );
        assert_eq!(addrs(&a.additionals), ips(&["10.0.0.1", "10.0.0.2"]));
        // The protocol label exists (an empty non-terminal): NODATA.
        assert_nodata(&answer(
            &index,
            &format!("{proto}.user.xingren.host."),
            RecordType::SRV,
        ));
    }
    assert_nodata(&answer(
        &index,
        "_http._tcp.user.xingren.host.",
        RecordType::A,
    ));
    assert_nxdomain(&answer(
        &index,
        "_grpc._tcp.user.xingren.host.",
        RecordType::SRV,
    ));
    // `order` has no named port: no `_tcp` below it.
    assert_nxdomain(&answer(&index, "_tcp.order.xingren.host.", RecordType::SRV));
}

#[test]
fn instance_names_answer_address_and_metadata() {
    let index = fixture();
    let a = answer(&index, "u1.user.xingren.host.", RecordType::A);
    assert_eq!(addrs(&a.answers), ips(&["10.0.0.1"]));
    let txt = answer(&index, "u1.user.xingren.host.", RecordType::TXT);
    assert_eq!(txt.answers.len(), 1);
    let RData::TXT(t) = &txt.answers[0].data else {
        panic!("{:?}", txt.answers)
    };
    let strings: Vec<String> = t
        .txt_data
        .iter()
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .collect();
    assert_eq!(strings, vec!["version=1.2.3", "zone=a"]);
    // No metadata: the name exists, TXT is NODATA.
    assert_nodata(&answer(&index, "u2.user.xingren.host.", RecordType::TXT));
    // An IPv6 instance has AAAA, and A is NODATA.
    assert_eq!(
        addrs(&answer(&index, "u6.user.xingren.host.", RecordType::AAAA).answers),
        ips(&["fd00::6"])
    );
    assert_nodata(&answer(&index, "u6.user.xingren.host.", RecordType::A));
    // The instance name answers even while it is critical.
    assert_eq!(
        addrs(&answer(&index, "u3.user.xingren.host.", RecordType::A).answers),
        ips(&["10.0.0.3"])
    );
    assert_nxdomain(&answer(&index, "u9.user.xingren.host.", RecordType::A));
}

#[test]
fn tags_answer_healthy_instances_carrying_them() {
    let index = fixture();
    let a = answer(&index, "v2.tag.user.xingren.host.", RecordType::A);
    assert_eq!(addrs(&a.answers), ips(&["10.0.0.1", "10.0.0.2"]));
    let canary = answer(&index, "canary.tag.user.xingren.host.", RecordType::SRV);
    assert_eq!(
        srvs(&canary.answers),
        vec![(10, 300, 8080, "u1.user.xingren.host.".to_string())]
    );
    assert_eq!(addrs(&canary.additionals), ips(&["10.0.0.1"]));
    // Only critical u3 has `old`: the name exists, no records.
    assert_nodata(&answer(&index, "old.tag.user.xingren.host.", RecordType::A));
    assert_nodata(&answer(&index, "tag.user.xingren.host.", RecordType::A));
    assert_nxdomain(&answer(
        &index,
        "blue.tag.user.xingren.host.",
        RecordType::A,
    ));
    assert_nxdomain(&answer(&index, "tag.order.xingren.host.", RecordType::A));
}

#[test]
fn dns_sd_enumerates_every_service() {
    let index = fixture();
    let a = answer(
        &index,
        "_services._dns-sd._udp.xingren.host.",
        RecordType::PTR,
    );
    let targets = sorted(
        a.answers
            .iter()
            .map(|r| match &r.data {
                RData::PTR(p) => p.0.to_ascii(),
                other => panic!("{other:?}"),
            })
            .collect(),
    );
    assert_eq!(
        targets,
        vec!["_order._tcp.xingren.host.", "_user._tcp.xingren.host."]
    );
    assert_nodata(&answer(
        &index,
        "_dns-sd._udp.xingren.host.",
        RecordType::PTR,
    ));
    assert_nodata(&answer(&index, "_udp.xingren.host.", RecordType::PTR));
}

#[test]
fn dns_sd_browses_instances_of_a_service_type() {
    let index = fixture();
    let texts = |name: &str, qtype| -> Vec<String> {
        sorted(
            answer(&index, name, qtype)
                .answers
                .iter()
                .map(|r| r.data.to_string())
                .collect(),
        )
    };
    // Healthy instances only: u3 is critical.
    assert_eq!(
        texts("_user._tcp.xingren.host.", RecordType::PTR),
        vec![
            "u1._user._tcp.xingren.host.",
            "u2._user._tcp.xingren.host.",
            "u6._user._tcp.xingren.host.",
        ]
    );
    assert_eq!(
        texts("u1._User._tcp.xingren.host.", RecordType::SRV),
        vec!["10 300 8080 u1.user.xingren.host."]
    );
    let srv = answer(&index, "u1._user._tcp.xingren.host.", RecordType::SRV);
    assert_eq!(srv.additionals.len(), 1, "the target's address as glue");
    let txt = answer(&index, "u1._user._tcp.xingren.host.", RecordType::TXT);
    match &txt.answers[0].data {
        RData::TXT(t) => assert_eq!(
            t.txt_data.iter().map(|s| &s[..]).collect::<Vec<_>>(),
            vec![&b"version=1.2.3"[..], &b"zone=a"[..]]
        ),
        other => panic!("{other:?}"),
    }
    // No metadata: one empty string (RFC 6763 §6.1).
    let txt = answer(&index, "o1._order._tcp.xingren.host.", RecordType::TXT);
    match &txt.answers[0].data {
        RData::TXT(t) => assert_eq!(t.txt_data.len(), 1),
        other => panic!("{other:?}"),
    }
    for domain in [
        "b._dns-sd._udp.xingren.host.",
        "lb._dns-sd._udp.xingren.host.",
    ] {
        assert_eq!(texts(domain, RecordType::PTR), vec!["xingren.host."]);
    }
    assert_nodata(&answer(&index, "_tcp.xingren.host.", RecordType::PTR));
    assert_nodata(&answer(&index, "_user._tcp.xingren.host.", RecordType::A));
    assert_nxdomain(&answer(
        &index,
        "u3._user._tcp.xingren.host.",
        RecordType::SRV,
    ));
    assert_nxdomain(&answer(
        &index,
        "_nobody._tcp.xingren.host.",
        RecordType::PTR,
    ));
    assert_nxdomain(&answer(
        &index,
        "x.nobody._tcp.xingren.host.",
        RecordType::PTR,
    ));
    // The names served before stay.
    assert_eq!(texts("user.xingren.host.", RecordType::SRV).len(), 3);
}

#[test]
fn reverse_names_of_instances_answer_ptr() {
    let index = fixture();
    let a = answer(&index, "1.0.0.10.in-addr.arpa.", RecordType::PTR);
    assert!(a.authoritative);
    assert_eq!(a.answers.len(), 1);
    assert_eq!(
        a.answers[0].data,
        RData::PTR(hickory_proto::rr::rdata::PTR(
            Name::from_ascii("u1.user.xingren.host.").unwrap()
        ))
    );
    let v6 = Name::from("fd00::6".parse::<IpAddr>().unwrap()).to_ascii();
    let a6 = answer(&index, &v6, RecordType::PTR);
    assert_eq!(a6.answers.len(), 1);
    // Unknown reverse names, and other types at known ones, are not ours.
    assert!(ask(&index, "9.9.0.10.in-addr.arpa.", RecordType::PTR).is_none());
    assert!(ask(&index, "1.0.0.10.in-addr.arpa.", RecordType::A).is_none());
}

#[test]
fn shared_addresses_make_one_record_with_summed_weight() {
    let mut c = Fill::default();
    c.put(&instance("db", "d1", "10.0.0.9", 5432));
    c.put(&instance("db", "d2", "10.0.0.9", 5433));
    c.put(&instance("db", "d3", "10.0.0.8", 5432));
    let index = Index::build(&c.snapshot(), &zone(None));
    let a = answer(&index, "db.xingren.host.", RecordType::A);
    assert_eq!(addrs(&a.answers), ips(&["10.0.0.8", "10.0.0.9"]));
    // The reverse name of a shared address names every instance on it.
    let ptr = answer(&index, "9.0.0.10.in-addr.arpa.", RecordType::PTR);
    assert_eq!(ptr.answers.len(), 2);
    // SRV keeps one record per instance.
    assert_eq!(
        answer(&index, "db.xingren.host.", RecordType::SRV)
            .answers
            .len(),
        3
    );
}

#[test]
fn apex_has_soa_and_ns_with_glue() {
    let index = fixture();
    let soa = answer(&index, "xingren.host.", RecordType::SOA);
    assert_eq!(soa.answers.len(), 1);
    let RData::SOA(s) = &soa.answers[0].data else {
        panic!()
    };
    assert_eq!(s.mname.to_ascii(), "ns.xingren.host.");
    assert_eq!(s.rname.to_ascii(), "hostmaster.xingren.host.");
    assert_eq!(i64::from(s.serial), index.revision);
    assert_eq!(s.minimum, 5);
    let ns = answer(&index, "xingren.host.", RecordType::NS);
    assert_eq!(ns.answers.len(), 1);
    assert_eq!(addrs(&ns.additionals), ips(&["192.0.2.53"]));
    assert_eq!(
        addrs(&answer(&index, "ns.xingren.host.", RecordType::A).answers),
        ips(&["192.0.2.53"])
    );
    assert_nodata(&answer(&index, "xingren.host.", RecordType::A));

    // Without a configured address: NS without glue, and no `ns` name.
    let bare = Index::build(&Fill::default().snapshot(), &zone(None));
    assert!(
        answer(&bare, "xingren.host.", RecordType::NS)
            .additionals
            .is_empty()
    );
    assert_nxdomain(&answer(&bare, "ns.xingren.host.", RecordType::A));
}

#[test]
fn soa_serial_is_the_revision_truncated() {
    let mut snap = Fill::default().snapshot();
    snap.revision = (1_i64 << 32) + 7;
    let index = Index::build(&snap, &zone(None));
    let RData::SOA(s) = &answer(&index, "xingren.host.", RecordType::SOA).answers[0].data else {
        panic!()
    };
    assert_eq!(s.serial, 7);
}

#[test]
fn negative_answers_carry_the_soa() {
    let index = fixture();
    let nx = answer(&index, "nobody.xingren.host.", RecordType::A);
    assert_nxdomain(&nx);
    let RData::SOA(s) = &nx.authorities[0].data else {
        panic!()
    };
    // RFC 2308 §3: the SOA's TTL in a negative answer is the negative TTL.
    assert_eq!(nx.authorities[0].ttl, s.minimum);
    assert_nxdomain(&answer(&index, "a.b.u1.user.xingren.host.", RecordType::A));
    // Known name, other type.
    assert_nodata(&answer(&index, "user.xingren.host.", RecordType::TXT));
    assert_nodata(&answer(&index, "order.xingren.host.", RecordType::AAAA));
}

#[test]
fn services_without_healthy_instances_are_nodata() {
    let mut c = Fill::default();
    c.put(&instance("pay", "p1", "10.0.2.1", 80))
        .critical("pay", "p1");
    let index = Index::build(&c.snapshot(), &zone(None));
    assert_nodata(&answer(&index, "pay.xingren.host.", RecordType::A));
    assert_nodata(&answer(&index, "pay.xingren.host.", RecordType::SRV));
}

#[test]
fn names_outside_the_zone_are_not_ours() {
    let index = fixture();
    for name in [
        "example.com.",
        "host.",
        ".",
        "xingren.host.example.",
        "userxingren.host.",
    ] {
        assert!(ask(&index, name, RecordType::A).is_none(), "{name}");
    }
}

#[test]
fn matching_ignores_case_and_answers_echo_the_question() {
    let index = fixture();
    let a = answer(&index, "UsEr.XingRen.HOST.", RecordType::A);
    assert_eq!(addrs(&a.answers), ips(&["10.0.0.1", "10.0.0.2"]));
    for r in &a.answers {
        // Byte-for-byte the question's spelling (0x20 case randomisation).
        assert_eq!(r.name.to_ascii(), "UsEr.XingRen.HOST.");
    }
    // A name without the trailing dot is the same name.
    let rel = answer(&index, "user.xingren.host", RecordType::A);
    assert_eq!(addrs(&rel.answers), ips(&["10.0.0.1", "10.0.0.2"]));
}

#[test]
fn any_returns_every_set_at_the_name() {
    let index = fixture();
    let a = answer(&index, "u1.user.xingren.host.", RecordType::ANY);
    let types = sorted(a.answers.iter().map(|r| r.record_type()).collect());
    assert_eq!(types, sorted(vec![RecordType::A, RecordType::TXT]));
}

// --- fitting into UDP ---------------------------------------------------

fn queries(name: &str, qtype: RecordType) -> Queries {
    let q = Query::query(Name::from_ascii(name).unwrap(), qtype);
    let mut bytes = Vec::new();
    q.emit(&mut BinEncoder::new(&mut bytes)).unwrap();
    Queries::read(&mut BinDecoder::new(&bytes), 1).unwrap()
}

/// Encodes `answer` as the server would, with no size limit, and decodes it.
fn encode(answer: &Answer, queries: &Queries) -> (usize, Message) {
    let mut buf = Vec::new();
    let mut metadata = Metadata::new(1, MessageType::Response, OpCode::Query);
    metadata.truncation = answer.truncated;
    metadata.response_code = answer.rcode;
    MessageResponseBuilder::new(queries, None)
        .build(
            metadata,
            answer.answers.iter(),
            answer.authorities.iter(),
            iter::empty(),
            answer.additionals.iter(),
        )
        .destructive_emit(&mut BinEncoder::new(&mut buf))
        .unwrap();
    let msg = Message::from_vec(&buf).unwrap();
    (buf.len(), msg)
}

fn big_service(n: u16) -> Index {
    let mut c = Fill::default();
    for i in 0..n {
        let mut inst = instance(
            "big",
            &format!("i{i}"),
            &format!("10.1.{}.{}", i / 250, i % 250 + 1),
            80,
        );
        inst.weight = 1 + i;
        c.put(&inst);
    }
    Index::build(&c.snapshot(), &zone(None))
}

#[test]
fn udp_answers_are_whole_or_tc_unless_a_limit_asks_for_a_subset() {
    let index = big_service(100);
    let q = queries("big.xingren.host.", RecordType::A);

    // By the DNS rules: 100 records do not fit in 512 bytes, so none are
    // sent and TC sends the client to TCP (RFC 2181 §9).
    let mut a = answer(&index, "big.xingren.host.", RecordType::A);
    assert_eq!(a.answers.len(), 100);
    a.fit(&q, 512, Fit::Whole);
    let (len, msg) = encode(&a, &q);
    assert!(len <= 512, "{len}");
    assert!(a.truncated && msg.metadata.truncation);
    assert!(msg.answers.is_empty());
    // A size that holds them: whole, no TC.
    let mut whole = answer(&index, "big.xingren.host.", RecordType::A);
    whole.fit(&q, 4096, Fit::Whole);
    assert!(!whole.truncated);
    assert_eq!(encode(&whole, &q).1.answers.len(), 100);

    // As many as fit (TCP's rule), without TC.
    let mut cut = answer(&index, "big.xingren.host.", RecordType::A);
    cut.fit(&q, 512, Fit::AsManyAsFit);
    let (len, msg) = encode(&cut, &q);
    assert!(len <= 512, "{len}");
    assert!(!cut.truncated && !msg.metadata.truncation);
    // One more record (16 bytes compressed) would not have fitted.
    assert!(len + 16 > 512, "{len}: room was left");
    assert!(cut.answers.len() > 20, "{}", cut.answers.len());

    // `--udp-answer-limit 3`: three, no TC.
    let mut three = answer(&index, "big.xingren.host.", RecordType::A);
    three.keep_answers(3);
    three.fit(&q, 512, Fit::AsManyAsFit);
    assert!(!three.truncated);
    assert_eq!(encode(&three, &q).1.answers.len(), 3);
}

#[test]
fn udp_srv_keeps_answers_first_then_the_glue_that_fits() {
    let index = big_service(40);
    let q = queries("big.xingren.host.", RecordType::SRV);
    let mut a = answer(&index, "big.xingren.host.", RecordType::SRV);
    a.fit(&q, 1232 - crate::response::OPT_LEN, Fit::AsManyAsFit);
    let (len, msg) = encode(&a, &q);
    assert!(len <= 1232 - crate::response::OPT_LEN, "{len}");
    assert!(!msg.metadata.truncation);
    assert!(!msg.answers.is_empty() && msg.answers.len() < 40);
    // Glue only for kept answers, in their order.
    let targets: Vec<Name> = msg
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => s.target.clone(),
            _ => panic!(),
        })
        .collect();
    assert!(msg.additionals.len() <= targets.len());
    for (glue, target) in msg.additionals.iter().zip(&targets) {
        assert_eq!(&glue.name, target);
    }

    // By the DNS rules, answers that fit whole with only part of their
    // glue: every answer, the glue that fits, no TC (glue is optional).
    let index = big_service(25);
    let mut a = answer(&index, "big.xingren.host.", RecordType::SRV);
    a.fit(&q, 1232 - crate::response::OPT_LEN, Fit::Whole);
    let (_, msg) = encode(&a, &q);
    assert!(!msg.metadata.truncation);
    assert_eq!(msg.answers.len(), 25);
    assert!(msg.additionals.len() < 25, "{}", msg.additionals.len());
}

#[test]
fn a_record_too_big_for_udp_is_tc() {
    let mut c = Fill::default();
    let mut fat = instance("fat", "f1", "10.0.3.1", 80);
    for i in 0..6 {
        fat.meta
            .insert(format!("k{i}").into(), "x".repeat(200).into());
    }
    c.put(&fat);
    let index = Index::build(&c.snapshot(), &zone(None));
    let q = queries("f1.fat.xingren.host.", RecordType::TXT);
    let mut a = answer(&index, "f1.fat.xingren.host.", RecordType::TXT);
    a.fit(&q, 512, Fit::Whole);
    assert!(a.truncated);
    let (len, msg) = encode(&a, &q);
    assert!(len <= 512);
    assert!(msg.metadata.truncation);
    assert!(msg.answers.is_empty());
    // A 4096-byte client gets it whole.
    let mut whole = answer(&index, "f1.fat.xingren.host.", RecordType::TXT);
    whole.fit(&q, 4096, Fit::Whole);
    assert!(!whole.truncated);
    assert_eq!(whole.answers.len(), 1);
}

#[test]
fn cut_answers_follow_the_weights() {
    // 60 addresses, weights 1..=60: a 512-byte answer cut to what fits
    // (TCP's rule, here in 512 bytes) holds about 30.
    // Over many answers, the heaviest decile must be kept far more often
    // than the lightest (expected ratio near 60/6 for the first place;
    // inclusion saturates, so check a conservative bound).
    let index = big_service(60);
    let q = queries("big.xingren.host.", RecordType::A);
    let qname = Name::from_ascii("big.xingren.host.").unwrap();
    let key = KeyBuf::from_name(&qname).unwrap();
    let mut rng = SmallRng::seed_from_u64(99);
    let mut kept: BTreeMap<IpAddr, u32> = BTreeMap::new();
    let mut firsts: BTreeMap<IpAddr, u32> = BTreeMap::new();
    let rounds = 3000;
    for _ in 0..rounds {
        let res = index.resolve(key.as_bytes(), RecordType::A);
        let Some(mut a) = Answer::from_index(&res, &index, &qname, &mut rng) else {
            panic!()
        };
        a.fit(&q, 512, Fit::AsManyAsFit);
        assert!(a.answers.len() < 60);
        *firsts.entry(addrs(&a.answers[..1])[0]).or_default() += 1;
        for ip in addrs(&a.answers) {
            *kept.entry(ip).or_default() += 1;
        }
    }
    let weight_of = |ip: &IpAddr| -> u32 {
        let IpAddr::V4(v4) = ip else { panic!() };
        let o = v4.octets();
        u32::from(o[2]) * 250 + u32::from(o[3])
    };
    let (mut light, mut heavy, mut light_first, mut heavy_first) = (0, 0, 0, 0);
    for (ip, n) in &kept {
        match weight_of(ip) {
            1..=6 => light += n,
            55..=60 => heavy += n,
            _ => {}
        }
    }
    for (ip, n) in &firsts {
        match weight_of(ip) {
            1..=6 => light_first += n,
            55..=60 => heavy_first += n,
            _ => {}
        }
    }
    assert!(heavy > 3 * light, "heavy kept {heavy}, light kept {light}");
    // First place: P ∝ weight, so heavy/light ≈ (55+..+60)/(1+..+6) = 345/21.
    assert!(
        heavy_first > 8 * light_first.max(1),
        "first: heavy {heavy_first}, light {light_first}"
    );
}

/// An answer as comparable text: its rcode and its records, sorted.
fn answer_text(a: Option<Answer>) -> Option<(hickory_proto::op::ResponseCode, Vec<String>)> {
    a.map(|a| {
        let mut v: Vec<String> = a
            .answers
            .iter()
            .chain(&a.authorities)
            .chain(&a.additionals)
            .map(|r| r.to_string())
            .collect();
        v.sort();
        (a.rcode, v)
    })
}

#[test]
fn incremental_builds_answer_like_full_builds() {
    let mut c = Fill::default();
    let mut u1 = instance("user", "u1", "10.0.0.1", 8080);
    u1.tags = vec!["v2".into()];
    c.put(&u1).put(&instance("order", "o1", "10.0.1.1", 7000));
    let zone = zone(Some("192.0.2.53"));
    let first = Index::build(&c.snapshot(), &zone);
    // Change `user` (health, then a new instance sharing o1's address), add
    // `ns` (which takes ns.Z from the server) and remove nothing else.
    c.critical("user", "u1");
    c.put(&instance("user", "u2", "10.0.1.1", 8080));
    c.put(&instance("ns", "n1", "10.0.2.1", 53));
    let snapshot = c.snapshot();
    let incremental = Index::build_from(&snapshot, &zone, Some(&first));
    let full = Index::build(&snapshot, &zone);
    let queries = [
        ("user.xingren.host.", RecordType::A),
        ("user.xingren.host.", RecordType::SRV),
        ("v2.tag.user.xingren.host.", RecordType::A),
        ("u2.user.xingren.host.", RecordType::A),
        ("order.xingren.host.", RecordType::A),
        ("ns.xingren.host.", RecordType::A),
        ("xingren.host.", RecordType::NS),
        ("xingren.host.", RecordType::SOA),
        ("_services._dns-sd._udp.xingren.host.", RecordType::PTR),
        ("1.1.0.10.in-addr.arpa.", RecordType::PTR),
        ("1.0.0.10.in-addr.arpa.", RecordType::PTR),
        ("nobody.xingren.host.", RecordType::A),
        ("u1.user.xingren.host.", RecordType::ANY),
    ];
    let text = answer_text;
    for (name, qtype) in queries {
        assert_eq!(
            text(ask(&incremental, name, qtype)),
            text(ask(&full, name, qtype)),
            "{name} {qtype}"
        );
    }
    // The unchanged service is shared, not rebuilt.
    let order = |i: &Index| i.services.get("order").cloned().unwrap();
    assert!(Arc::ptr_eq(&order(&first), &order(&incremental)));
    assert!(!Arc::ptr_eq(
        &first.services.get("user").cloned().unwrap(),
        &incremental.services.get("user").cloned().unwrap()
    ));
    // The PTR of the shared address names both instances.
    let ptr = answer(&incremental, "1.1.0.10.in-addr.arpa.", RecordType::PTR);
    assert_eq!(ptr.answers.len(), 2);
}

mod incremental {
    use super::*;
    use proptest::prelude::*;

    const SERVICES: [&str; 3] = ["user", "order", "ns"];
    const ADDRESSES: [&str; 3] = ["10.0.0.1", "10.0.0.2", "fd00::1"];

    /// One change to a catalog of 3 services (one named `ns`, which takes
    /// `ns.Z` from the server) × 3 instances over 3 addresses, shared
    /// between services so that reverse names hold several.
    #[derive(Debug, Clone)]
    enum Op {
        Put(usize, usize, usize, bool),
        Remove(usize, usize),
        Critical(usize, usize),
        Index,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3usize, 0..3usize, 0..3usize, any::<bool>())
                .prop_map(|(s, i, a, tag)| Op::Put(s, i, a, tag)),
            (0..3usize, 0..3usize).prop_map(|(s, i)| Op::Remove(s, i)),
            (0..3usize, 0..3usize).prop_map(|(s, i)| Op::Critical(s, i)),
            Just(Op::Index),
        ]
    }

    /// Every question whose answer could differ.
    fn questions() -> Vec<(String, RecordType)> {
        let mut q = vec![
            (ZONE.to_string(), RecordType::SOA),
            (ZONE.to_string(), RecordType::NS),
            (format!("ns.{ZONE}"), RecordType::A),
            (format!("_services._dns-sd._udp.{ZONE}"), RecordType::PTR),
            (format!("nobody.{ZONE}"), RecordType::A),
            ("1.0.0.10.in-addr.arpa.".into(), RecordType::PTR),
            ("2.0.0.10.in-addr.arpa.".into(), RecordType::PTR),
            (
                "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.".into(),
                RecordType::PTR,
            ),
        ];
        for svc in SERVICES {
            for qtype in [
                RecordType::A,
                RecordType::AAAA,
                RecordType::SRV,
                RecordType::ANY,
            ] {
                q.push((format!("{svc}.{ZONE}"), qtype));
                q.push((format!("blue.tag.{svc}.{ZONE}"), qtype));
            }
            q.push((format!("_{svc}._tcp.{ZONE}"), RecordType::PTR));
            for i in 0..3 {
                q.push((format!("i{i}._{svc}._tcp.{ZONE}"), RecordType::ANY));
                q.push((format!("i{i}.{svc}.{ZONE}"), RecordType::ANY));
            }
        }
        q
    }

    use super::answer_text as text;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(150))]

        #[test]
        fn incremental_indexes_answer_like_full_builds(ops in proptest::collection::vec(op(), 1..40)) {
            let zone = zone(Some("192.0.2.53"));
            let mut c = Fill::default();
            let mut index = Index::build(&c.snapshot(), &zone);
            for op in ops.into_iter().chain([Op::Index]) {
                match op {
                    Op::Put(s, i, a, tag) => {
                        let mut inst = instance(SERVICES[s], &format!("i{i}"), ADDRESSES[a], 8080);
                        if tag {
                            inst.tags = vec!["blue".into()];
                        }
                        c.put(&inst);
                    }
                    Op::Remove(s, i) => {
                        c.delete(SERVICES[s], &format!("i{i}"));
                    }
                    Op::Critical(s, i) => {
                        c.critical(SERVICES[s], &format!("i{i}"));
                    }
                    Op::Index => {
                        let snapshot = c.snapshot();
                        index = Index::build_from(&snapshot, &zone, Some(&index));
                        let full = Index::build(&snapshot, &zone);
                        for (name, qtype) in questions() {
                            prop_assert_eq!(
                                text(ask(&index, &name, qtype)),
                                text(ask(&full, &name, qtype)),
                                "{} {}", name, qtype
                            );
                        }
                    }
                }
            }
        }
    }
}

/// How long building the index of a 1000-service catalog takes (run with
/// `cargo test --release -p signpost-dns --lib -- --ignored --nocapture`).
#[test]
#[ignore = "timing, not a check"]
fn index_build_time() {
    let mut c = Fill::default();
    for s in 0..1000u32 {
        for j in 1..=2u32 {
            c.put(&instance(
                &format!("svc{s}"),
                &format!("i{j}"),
                &format!("10.{j}.{}.{}", s / 250, s % 250),
                8080,
            ));
        }
    }
    let snapshot = c.snapshot();
    let zone = zone(Some("127.0.0.1"));
    let mut index = Index::build(&snapshot, &zone);
    for _ in 0..3 {
        let start = std::time::Instant::now();
        index = Index::build(&snapshot, &zone);
        println!(
            "index of {} services built in {:?}",
            snapshot.services.len(),
            start.elapsed()
        );
    }
    for i in 0..3 {
        c.put(&instance(&format!("new{i}"), "n1", "10.9.9.9", 80));
        let snapshot = c.snapshot();
        let start = std::time::Instant::now();
        index = Index::build_from(&snapshot, &zone, Some(&index));
        println!(
            "index rebuilt after one registration in {:?}",
            start.elapsed()
        );
    }
    let start = std::time::Instant::now();
    let snap = c.snapshot();
    println!("catalog snapshot in {:?}", start.elapsed());
    drop(snap);
}

#[test]
fn a_meta_pair_longer_than_a_character_string_is_left_out_of_txt() {
    let mut c = Fill::default();
    let mut inst = instance("user", "u1", "10.0.0.1", 80);
    inst.meta.insert("version".into(), "1.2.3".into());
    inst.meta.insert("notes".into(), "x".repeat(300).into());
    c.put(&inst);
    let index = Index::build(&c.snapshot(), &zone(None));
    let a = answer(&index, "u1.user.xingren.host.", RecordType::TXT);
    let txt: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
    assert_eq!(txt.len(), 1, "{txt:?}");
    assert!(txt[0].contains("version=1.2.3"), "{txt:?}");
    assert!(!txt[0].contains("notes"), "{txt:?}");
}
