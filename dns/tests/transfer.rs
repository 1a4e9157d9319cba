//! Zone transfers out of the live registry: AXFR and IXFR read raw, with
//! `dig` and `kdig`, and Knot DNS as a real secondary that follows every
//! change by NOTIFY and IXFR.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use signpost_dns::DnsConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn transfer_config() -> DnsConfig {
    DnsConfig {
        allow_transfer: vec!["127.0.0.0/8".parse().unwrap()],
        // The NS's glue, as the binary publishes it: a secondary checks it.
        ns_address: Some("127.0.0.1".parse().unwrap()),
        ..test_config()
    }
}

/// Sends `msg` over TCP and reads every message of the reply until the
/// transfer ends (the closing SOA) or the server stops sending.
async fn transfer(addr: SocketAddr, msg: &Message) -> Vec<Message> {
    let mut stream = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let bytes = msg.to_vec().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).await.unwrap();
    let mut out: Vec<Message> = Vec::new();
    let mut end = End::default();
    loop {
        let mut len = [0u8; 2];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut len));
        match read.await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await.unwrap();
        let reply = Message::from_vec(&reply).expect("transfer message decodes");
        assert_eq!(reply.metadata.id, msg.metadata.id);
        let done = reply.metadata.response_code != ResponseCode::NoError || end.ended(&reply);
        out.push(reply);
        if done {
            break;
        }
    }
    assert!(!out.is_empty(), "no reply");
    out
}

/// Follows a transfer's records to its end: the serial of the first SOA
/// closes it (a lone SOA, an AXFR's second, an IXFR's third).
#[derive(Default)]
struct End {
    first: Option<u32>,
    records: usize,
    incremental: bool,
    closing: usize,
}

impl End {
    /// Takes `message` in; whether the transfer is complete.
    fn ended(&mut self, message: &Message) -> bool {
        for r in &message.answers {
            let serial = match &r.data {
                RData::SOA(soa) => Some(soa.serial),
                _ => None,
            };
            self.records += 1;
            match self.records {
                1 => {
                    self.first = serial;
                    self.closing = 1;
                }
                2 => self.incremental = serial.is_some(),
                _ => {}
            }
            if self.records > 1 && serial.is_some() && serial == self.first {
                self.closing += 1;
            }
        }
        if self.first.is_none() {
            return true;
        }
        let closing = if self.incremental { 3 } else { 2 };
        // A lone SOA is the whole answer when it is the whole message.
        (self.records == 1 && message.answers.len() == 1) || self.closing >= closing
    }
}

fn answers(messages: &[Message]) -> Vec<Record> {
    messages.iter().flat_map(|m| m.answers.clone()).collect()
}

fn serial_of(record: &Record) -> u32 {
    match &record.data {
        RData::SOA(soa) => soa.serial,
        other => panic!("not a SOA: {other:?}"),
    }
}

/// The records of a transfer (SOA aside) as sorted text, by name and type.
fn by_rrset(records: &[Record]) -> BTreeMap<(String, RecordType), Vec<String>> {
    let mut sets: BTreeMap<(String, RecordType), Vec<String>> = BTreeMap::new();
    for r in records {
        if r.record_type() == RecordType::SOA {
            continue;
        }
        sets.entry((r.name.to_ascii(), r.record_type()))
            .or_default()
            .push(format!("{} {}", r.ttl, r.data));
    }
    for v in sets.values_mut() {
        v.sort();
    }
    sets
}

/// Asks `addr` every name and type in `sets` over TCP and checks the answers
/// are exactly the sets.
async fn assert_answers_equal(
    addr: SocketAddr,
    sets: &BTreeMap<(String, RecordType), Vec<String>>,
) {
    for ((name, rtype), expected) in sets {
        let reply = tcp_exchange(addr, &query_message(name, *rtype, None, false)).await;
        let mut got: Vec<String> = reply
            .answers
            .iter()
            .map(|r| format!("{} {}", r.ttl, r.data))
            .collect();
        got.sort();
        assert_eq!(&got, expected, "{name} {rtype} at {addr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axfr_holds_exactly_what_queries_answer() {
    let server = start(transfer_config(), &standard_fill()).await;
    let reply = transfer(
        server.addr,
        &query_message("xingren.host.", RecordType::AXFR, None, false),
    )
    .await;
    assert!(reply.iter().all(|m| m.metadata.authoritative));
    let records = answers(&reply);
    let revision = server.catalog.snapshot().revision as u32;
    assert_eq!(records.first().map(serial_of), Some(revision));
    assert_eq!(records.last().map(serial_of), Some(revision));
    let sets = by_rrset(&records);
    // Healthy instances only where queries list healthy ones; u3 by name.
    let user_a = &sets[&("user.xingren.host.".to_string(), RecordType::A)];
    assert_eq!(user_a, &["5 10.0.0.1", "5 10.0.0.2"]);
    assert!(sets.contains_key(&("u3.user.xingren.host.".into(), RecordType::A)));
    assert!(sets.contains_key(&("u1._user._tcp.xingren.host.".into(), RecordType::SRV)));
    assert!(sets.contains_key(&(
        "_services._dns-sd._udp.xingren.host.".into(),
        RecordType::PTR
    )));
    // No reverse names: they are not in the zone.
    assert!(sets.keys().all(|(n, _)| n.ends_with("xingren.host.")));
    assert_answers_equal(server.addr, &sets).await;
    server.stop().await;
}

/// 10 services of 1,000 instances, each tagged and with metadata.
fn large_fill(services: u32) -> Fill {
    let mut fill = Fill::default();
    for s in 0..services {
        for i in 0..1000u32 {
            let n = s * 1000 + i;
            let mut inst = instance(
                &format!("svc{s}"),
                &format!("i{i}"),
                &format!("10.{}.{}.{}", n >> 16, (n >> 8) & 0xFF, n & 0xFF),
                8080,
            );
            inst.tags = vec!["blue".into()];
            inst.meta.insert("version".into(), "1.2.3".into());
            fill.put(&inst);
        }
    }
    fill
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_zone_is_sent_whole_over_many_messages() {
    // Far more messages than hickory queues per connection: the transfer
    // must wait for the connection to drain, not drop the rest.
    let server = start(transfer_config(), &large_fill(10)).await;
    let reply = transfer(
        server.addr,
        &query_message("xingren.host.", RecordType::AXFR, None, false),
    )
    .await;
    assert!(reply.len() > 40, "{} messages", reply.len());
    let records = answers(&reply);
    assert_eq!(
        records.last().map(|r| r.record_type()),
        Some(RecordType::SOA)
    );
    let instances = records
        .iter()
        .filter(|r| r.record_type() == RecordType::A && r.name.num_labels() == 4)
        .count();
    assert_eq!(instances, 10_000, "every <id>.<svc>.Z");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ixfr_sends_the_difference_or_the_whole_zone() {
    let mut fill = standard_fill();
    let server = start(transfer_config(), &fill).await;
    let old = server.catalog.snapshot().revision as u32;

    fill.put(&instance("pay", "p1", "10.0.5.1", 443));
    fill.delete("order", "o1");
    server.catalog.publish(&mut fill.state);
    let new = server.catalog.snapshot().revision as u32;
    eventually("the new serial is served", || async {
        let soa = tcp_exchange(
            server.addr,
            &query_message("xingren.host.", RecordType::SOA, None, false),
        )
        .await;
        soa.answers.first().map(serial_of) == Some(new)
    })
    .await;

    let ixfr = |serial: u32| {
        let mut q = query_message("xingren.host.", RecordType::IXFR, None, false);
        let mut soa = tcp_soa_template();
        if let RData::SOA(s) = &mut soa.data {
            s.serial = serial;
        }
        q.authorities.push(soa);
        q
    };
    let records = answers(&transfer(server.addr, &ixfr(old)).await);
    // New SOA, old SOA, what went, new SOA, what came, new SOA.
    let soas: Vec<(usize, u32)> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.record_type() == RecordType::SOA)
        .map(|(i, r)| (i, serial_of(r)))
        .collect();
    assert_eq!(soas.len(), 4, "{records:?}");
    assert_eq!(
        (soas[0].1, soas[1].1, soas[2].1, soas[3].1),
        (new, old, new, new)
    );
    let gone = by_rrset(&records[soas[1].0 + 1..soas[2].0]);
    let came = by_rrset(&records[soas[2].0 + 1..soas[3].0]);
    assert!(
        gone.contains_key(&("order.xingren.host.".into(), RecordType::A)),
        "{gone:?}"
    );
    assert!(
        came.contains_key(&("pay.xingren.host.".into(), RecordType::A)),
        "{came:?}"
    );
    assert!(came.contains_key(&("p1._pay._tcp.xingren.host.".into(), RecordType::SRV)));
    assert!(
        !gone
            .keys()
            .chain(came.keys())
            .any(|(n, _)| n.contains("user")),
        "an unchanged service is not in the difference"
    );

    // Up to date: the SOA alone.
    let records = answers(&transfer(server.addr, &ixfr(new)).await);
    assert_eq!(records.len(), 1);
    // A serial not kept: the whole zone, AXFR-style.
    let records = answers(&transfer(server.addr, &ixfr(old.wrapping_sub(1000))).await);
    assert_eq!(
        records
            .iter()
            .filter(|r| r.record_type() == RecordType::SOA)
            .count(),
        2
    );
    assert!(records.len() > 20);

    // kdig reads the same difference.
    let kdig = kdig(server.addr, &["xingren.host", &format!("IXFR={old}")]);
    assert!(kdig.contains("pay.xingren.host."), "{kdig}");
    server.stop().await;
}

/// A SOA record to carry a client's serial in an IXFR query.
fn tcp_soa_template() -> Record {
    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::SOA;
    let n = |s: &str| Name::from_ascii(s).unwrap();
    Record::from_rdata(
        n("xingren.host."),
        0,
        RData::SOA(SOA::new(
            n("ns.xingren.host."),
            n("hostmaster.xingren.host."),
            0,
            0,
            0,
            0,
            0,
        )),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_are_refused_outside_allow_transfer() {
    // Nobody by default.
    let server = start(test_config(), &standard_fill()).await;
    let reply = transfer(
        server.addr,
        &query_message("xingren.host.", RecordType::AXFR, None, false),
    )
    .await;
    assert_eq!(reply[0].metadata.response_code, ResponseCode::Refused);
    let out = dig(server.addr, &["xingren.host", "AXFR"]);
    assert!(out.contains("Transfer failed"), "{out}");
    server.stop().await;

    // Another network only.
    let config = DnsConfig {
        allow_transfer: vec!["10.0.0.0/8".parse().unwrap()],
        ..test_config()
    };
    let server = start(config, &standard_fill()).await;
    let reply = transfer(
        server.addr,
        &query_message("xingren.host.", RecordType::IXFR, None, false),
    )
    .await;
    assert_eq!(reply[0].metadata.response_code, ResponseCode::Refused);
    server.stop().await;

    // Allowed: dig reads the whole zone; another zone is not ours.
    let server = start(transfer_config(), &standard_fill()).await;
    let out = dig(server.addr, &["xingren.host", "AXFR"]);
    assert!(out.contains("XFR size:"), "{out}");
    assert!(out.contains("u1._user._tcp.xingren.host."), "{out}");
    let reply = transfer(
        server.addr,
        &query_message("example.com.", RecordType::AXFR, None, false),
    )
    .await;
    assert_eq!(reply[0].metadata.response_code, ResponseCode::NotAuth);
    server.stop().await;
}

fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tries=1", "+time=3"])
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run `dig` ({err}): apt-get install bind9-dnsutils"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kdig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("kdig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tcp"])
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run `kdig` ({err}): apt-get install knot-dnsutils"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A knotd started by a test, killed when dropped.
struct Knot {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Knot {
    /// Knot as a secondary of `xingren.host` transferring from `primary`,
    /// accepting its NOTIFYs, on a free loopback port.
    fn secondary_of(primary: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let d = dir.path().display();
        let conf = format!(
            "server:\n    rundir: \"{d}\"\n    listen: 127.0.0.1@{port}\n    udp-workers: 1\n    tcp-workers: 1\n    background-workers: 1\n\
             control:\n    listen: \"{d}/knot.sock\"\n\
             log:\n  - target: \"{d}/knot.log\"\n    any: info\n\
             database:\n    storage: \"{d}/db\"\n\
             remote:\n  - id: signpost\n    address: {ip}@{pport}\n\
             acl:\n  - id: from_signpost\n    address: {ip}\n    action: notify\n\
             template:\n  - id: default\n    storage: \"{d}/zones\"\n    zonefile-sync: -1\n    zonefile-load: none\n    journal-content: all\n\
             zone:\n  - domain: xingren.host\n    master: signpost\n    acl: from_signpost\n",
            ip = primary.ip(),
            pport = primary.port(),
        );
        for sub in ["db", "zones"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let conf_path = dir.path().join("knot.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("knotd")
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot run `knotd` ({err}): these tests need Knot DNS (apt-get install knot)"
                )
            });
        Knot {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log: dir.path().join("knot.log"),
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

async fn soa_serial(addr: SocketAddr) -> Option<u32> {
    let q = query_message("xingren.host.", RecordType::SOA, None, false);
    let bytes = q.to_vec().unwrap();
    let reply = udp_exchange_raw(addr, &bytes, Duration::from_millis(300)).await?;
    let reply = Message::from_vec(&reply).ok()?;
    reply.answers.first().map(serial_of)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knot_as_a_secondary_follows_every_change_by_ixfr() {
    let mut fill = standard_fill();
    // The NOTIFY target is Knot's port, known once Knot is configured; the
    // server's port must be known to configure Knot: bind Signpost first
    // on a port of our choosing.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let signpost_addr = probe.local_addr().unwrap();
    drop(probe);
    let knot = Knot::secondary_of(signpost_addr);
    let config = DnsConfig {
        listen: signpost_addr,
        notify: vec![knot.addr],
        ..transfer_config()
    };
    let server = start(config, &fill).await;

    // Knot loads the zone by AXFR at start-up.
    let first = server.catalog.snapshot().revision as u32;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while soa_serial(knot.addr).await != Some(first) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Knot never loaded the zone; its log:\n{}",
            knot.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let axfr = answers(
        &transfer(
            server.addr,
            &query_message("xingren.host.", RecordType::AXFR, None, false),
        )
        .await,
    );
    assert_answers_equal(knot.addr, &by_rrset(&axfr)).await;

    // A registration: Knot is told, transfers the difference, serves it.
    fill.put(&instance("pay", "p1", "10.0.5.1", 443));
    let registered = tokio::time::Instant::now();
    server.catalog.publish(&mut fill.state);
    let new = server.catalog.snapshot().revision as u32;
    let deadline = registered + Duration::from_secs(5);
    loop {
        let reply = udp_exchange(
            knot.addr,
            &query_message("pay.xingren.host.", RecordType::A, None, false),
        )
        .await
        .0;
        if reply.answers.len() == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Knot never served the registration; its log:\n{}",
            knot.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = registered.elapsed();
    if std::env::var_os("KNOT_LOG").is_some() {
        eprintln!("{}", knot.log());
    }
    eprintln!("registration served by the Knot secondary after {took:?}");
    assert_eq!(soa_serial(knot.addr).await, Some(new));
    let log = knot.log();
    assert!(
        log.lines()
            .any(|l| l.contains("IXFR, incoming") && l.contains("finished")),
        "Knot did not take the change by IXFR:\n{log}"
    );
    assert!(
        !log.contains("fallback to AXFR") && !log.contains("failed"),
        "Knot could not apply the IXFR:\n{log}"
    );

    // After a removal too, everything Knot serves equals what we serve.
    fill.delete("user", "u2");
    server.catalog.publish(&mut fill.state);
    let newer = server.catalog.snapshot().revision as u32;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while soa_serial(knot.addr).await != Some(newer) {
        assert!(tokio::time::Instant::now() < deadline, "{}", knot.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let axfr = answers(
        &transfer(
            server.addr,
            &query_message("xingren.host.", RecordType::AXFR, None, false),
        )
        .await,
    );
    let sets = by_rrset(&axfr);
    assert!(!sets.contains_key(&("u2.user.xingren.host.".into(), RecordType::A)));
    assert_answers_equal(knot.addr, &sets).await;
    assert_answers_equal(server.addr, &sets).await;
    server.stop().await;
}

/// A timing, not a check (run by hand in release): the AXFR of a zone of
/// 100,000 instances (100 services of 1,000, each with a tag and metadata).
///
/// `cargo test --release -p signpost-dns --test transfer -- --ignored --nocapture axfr_of_a_hundred_thousand`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing, not a check"]
async fn axfr_of_a_hundred_thousand_instances() {
    let fill = large_fill(100);
    let server = start(transfer_config(), &fill).await;
    let started = tokio::time::Instant::now();
    let reply = transfer(
        server.addr,
        &query_message("xingren.host.", RecordType::AXFR, None, false),
    )
    .await;
    let took = started.elapsed();
    let records: usize = reply.iter().map(|m| m.answers.len()).sum();
    eprintln!(
        "AXFR of 100,000 instances: {records} records in {} messages, {took:?} (client decoding included)",
        reply.len()
    );
    let addr = server.addr;
    let started = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        dig(addr, &["xingren.host", "AXFR", "+noall", "+stats"])
    })
    .await
    .unwrap();
    eprintln!("dig axfr: {:?}\n{out}", started.elapsed());
    server.stop().await;
}
