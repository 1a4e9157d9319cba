//! Hostile packets against the request path, without sockets: random bytes,
//! mutated valid queries and hand-made nasties go through hickory's decoder
//! (as the server does) and then our handler. Nothing may panic or hang, and
//! every response must decode, carry the query's id and fit its transport.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::handler::{Handler, Shared};
use crate::index::{Index, ZoneConfig};
use crate::metrics::Metrics;
use crate::testing::{Fill, instance};

/// Collects encoded responses, encoding like hickory's UDP/TCP handle.
#[derive(Clone)]
pub(crate) struct Capture {
    pub(crate) udp: bool,
    pub(crate) sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // hickory's limit: the response's OPT size over UDP, 512 without.
        let max = match response.edns() {
            _ if !self.udp => u16::MAX,
            Some(edns) => edns.max_payload(),
            None => 512,
        };
        let mut buf = Vec::new();
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(max);
        let info = response.destructive_emit(&mut encoder)?;
        self.sent
            .lock()
            .map_err(|_| NetError::Message("poisoned"))?
            .push(buf);
        Ok(info)
    }
}

pub(crate) fn handler() -> Handler {
    let mut c = Fill::default();
    for i in 0..40u8 {
        let mut inst = instance("user", &format!("u{i}"), &format!("10.0.0.{i}"), 8080);
        inst.tags = vec!["v2".into()];
        inst.ports.insert("http".into(), 8081);
        inst.meta
            .insert("k".into(), "v".repeat(usize::from(i) * 4).into());
        c.put(&inst);
    }
    c.put(&instance("order", "o1", "fd00::1", 80));
    let zone = ZoneConfig {
        origin: Name::from_ascii("xingren.host.").unwrap(),
        ttl: Duration::from_secs(5),
        negative_ttl: Duration::from_secs(5),
        ns_address: Some("127.0.0.1".parse().unwrap()),
    };
    let index = Index::build(&c.snapshot(), &zone);
    Handler(Arc::new(Shared {
        index: ArcSwap::from_pointee(index),
        zone,
        allow_recursion: crate::config::default_allow_recursion(),
        forwarder: None,
        metrics: Metrics::default(),
        max_udp_payload: 1232,
        udp_answer_limit: None,
        allow_query: None,
        identity: Default::default(),
        transfers: crate::transfer::Transfers::new(Vec::new()),
    }))
}

/// Valid queries to mutate.
pub(crate) fn seeds() -> Vec<Vec<u8>> {
    let names = [
        ("user.xingren.host.", RecordType::A),
        ("USER.xingren.host.", RecordType::SRV),
        ("_http._tcp.user.xingren.host.", RecordType::SRV),
        ("u7.user.xingren.host.", RecordType::TXT),
        ("v2.tag.user.xingren.host.", RecordType::AAAA),
        ("_services._dns-sd._udp.xingren.host.", RecordType::PTR),
        ("1.0.0.10.in-addr.arpa.", RecordType::PTR),
        ("xingren.host.", RecordType::ANY),
        ("example.com.", RecordType::A),
        ("_user._tcp.xingren.host.", RecordType::PTR),
        ("u1._user._tcp.xingren.host.", RecordType::SRV),
        ("lb._dns-sd._udp.xingren.host.", RecordType::PTR),
    ];
    let mut out = Vec::new();
    for (i, (name, qtype)) in names.iter().enumerate() {
        let mut msg = Message::new(i as u16, MessageType::Query, OpCode::Query);
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), *qtype));
        msg.metadata.recursion_desired = i % 2 == 0;
        if i % 3 != 0 {
            let mut edns = Edns::new();
            edns.set_max_payload(if i % 3 == 1 { 4096 } else { 100 });
            edns.set_dnssec_ok(i % 4 == 1);
            msg.edns = Some(edns);
        }
        out.push(msg.to_vec().unwrap());
    }
    out
}

/// Hand-made packets that have broken parsers elsewhere.
pub(crate) fn nasties() -> Vec<Vec<u8>> {
    let header = |qd: u16, an: u16, ar: u16| -> Vec<u8> {
        let mut h = vec![0x12, 0x34, 0x01, 0x00];
        h.extend_from_slice(&qd.to_be_bytes());
        h.extend_from_slice(&an.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&ar.to_be_bytes());
        h
    };
    let mut out = vec![
        // Too short for a header.
        Vec::new(),
        vec![0x12],
        vec![0; 11],
        // A header claiming 65535 questions, with none.
        header(u16::MAX, 0, 0),
    ];
    // A name that points at itself (a compression loop).
    let mut p = header(1, 0, 0);
    p.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
    out.push(p);
    // Two pointers pointing at each other.
    let mut p = header(1, 0, 0);
    p.extend_from_slice(&[0xC0, 14, 0xC0, 12, 0, 1, 0, 1]);
    out.push(p);
    // A pointer past the end.
    let mut p = header(1, 0, 0);
    p.extend_from_slice(&[0xC0, 0xFF, 0, 1, 0, 1]);
    out.push(p);
    // 127 one-byte labels (the most a 255-byte name holds), and 200.
    for labels in [127, 200] {
        let mut p = header(1, 0, 0);
        for _ in 0..labels {
            p.extend_from_slice(&[1, b'a']);
        }
        p.extend_from_slice(&[0, 0, 1, 0, 1]);
        out.push(p);
    }
    // Reserved label types (0x40, 0x80) and a 63+ length.
    for first in [0x40u8, 0x80, 0x3F, 0xFF] {
        let mut p = header(1, 0, 0);
        p.extend_from_slice(&[first, b'x', b'y', 0, 0, 1, 0, 1]);
        out.push(p);
    }
    // A valid question followed by 65535 claimed answers / additionals.
    for (an, ar) in [(u16::MAX, 0), (0, u16::MAX)] {
        let mut p = header(1, an, ar);
        p.extend_from_slice(b"\x04user\x07xingren\x04host\x00\x00\x01\x00\x01");
        out.push(p);
    }
    // An OPT record with a truncated option, and two OPT records.
    let mut p = header(1, 0, 1);
    p.extend_from_slice(b"\x04user\x07xingren\x04host\x00\x00\x01\x00\x01");
    p.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 8, 0, 10, 0, 20, 1, 2]);
    out.push(p);
    let mut p = header(1, 0, 2);
    p.extend_from_slice(b"\x04user\x07xingren\x04host\x00\x00\x01\x00\x01");
    for _ in 0..2 {
        p.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    }
    out.push(p);
    // Every byte of a valid query replaced by 0xFF in turn is covered by
    // the mutations; also a query with QR set (a response).
    let mut p = header(1, 0, 0);
    p[2] |= 0x80;
    p.extend_from_slice(b"\x04user\x07xingren\x04host\x00\x00\x01\x00\x01");
    out.push(p);
    out
}

pub(crate) fn mutate(rng: &mut SmallRng, seed: &[u8]) -> Vec<u8> {
    let mut p = seed.to_vec();
    for _ in 0..rng.random_range(1..=2) {
        match rng.random_range(0..6) {
            0 if !p.is_empty() => {
                let i = rng.random_range(0..p.len());
                p[i] = rng.random();
            }
            1 if !p.is_empty() => {
                let i = rng.random_range(0..p.len());
                p[i] ^= 1 << rng.random_range(0..8);
            }
            2 => {
                let at = rng.random_range(0..=p.len());
                p.truncate(at);
            }
            3 => {
                let at = rng.random_range(0..=p.len());
                let extra: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                p.splice(at..at, extra);
            }
            4 if p.len() > 13 => {
                // A compression pointer somewhere in the message.
                let i = rng.random_range(12..p.len() - 1);
                p[i] = 0xC0 | rng.random_range(0..0x40u8);
                p[i + 1] = rng.random();
            }
            _ => {
                let i = rng.random_range(0..12.min(p.len().max(1)));
                if let Some(b) = p.get_mut(i) {
                    *b = rng.random();
                }
            }
        }
    }
    p
}

/// Runs one packet through decode + handler; returns whether the handler
/// saw it.
async fn run_one(handler: &Handler, bytes: Vec<u8>, protocol: Protocol) -> bool {
    let Ok(request) = Request::from_bytes(bytes, "127.0.0.1:5300".parse().unwrap(), protocol)
    else {
        // hickory's server answers these with FORMERR itself (or drops
        // ones shorter than a header); our handler never sees them.
        return false;
    };
    if request.metadata.message_type == MessageType::Response {
        return false;
    }
    let capture = Capture {
        udp: protocol == Protocol::Udp,
        sent: Arc::default(),
    };
    let call = handler.handle_request::<_, TokioTime>(&request, capture.clone());
    tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .expect("handler hung on a hostile packet");
    let sent = capture.sent.lock().unwrap();
    assert_eq!(sent.len(), 1, "exactly one response per query");
    let reply = Message::from_vec(&sent[0]).expect("our response decodes");
    assert_eq!(reply.metadata.id, request.metadata.id);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    if protocol == Protocol::Udp {
        let limit = request
            .edns
            .as_ref()
            .map_or(512, |e| e.max_payload().clamp(512, 1232));
        assert!(
            sent[0].len() <= usize::from(limit),
            "{} > {limit}",
            sent[0].len()
        );
    }
    true
}

#[tokio::test]
async fn random_and_mutated_packets_never_break_the_handler() {
    let handler = handler();
    let mut rng = SmallRng::seed_from_u64(0x5169_9057);
    for packet in nasties() {
        run_one(&handler, packet.clone(), Protocol::Udp).await;
        run_one(&handler, packet, Protocol::Tcp).await;
    }
    let seeds = seeds();
    for seed in &seeds {
        run_one(&handler, seed.clone(), Protocol::Udp).await;
    }
    let mut handled = 0;
    for i in 0..20_000 {
        let packet = match i % 5 {
            // Pure noise, mostly rejected by the decoder.
            0 => (0..rng.random_range(0..600))
                .map(|_| rng.random())
                .collect(),
            _ => mutate(&mut rng, &seeds[i % seeds.len()]),
        };
        let protocol = if i % 7 == 0 {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        if run_one(&handler, packet, protocol).await {
            handled += 1;
        }
    }
    // The mutations must reach the handler, not just the decoder.
    assert!(
        handled > 4_000,
        "only {handled} packets reached the handler"
    );
}
