//! Records pre-encoded for the UDP fast path, built with the index.
//!
//! Every record the index can answer is also kept as wire bytes that do not
//! depend on where they land in a response, so answering a common query is a
//! header, a copy of the question and a few `memcpy`s:
//!
//! - An answer record's owner is the question's name, so it is written as a
//!   compression pointer to offset 12, where the question's name always is.
//!   The client sees its own spelling echoed (0x20), as with hickory, which
//!   also compresses the owner to the question.
//! - Names inside RDATA that end in the zone (PTR and NS targets, the SOA's
//!   names) come in two forms: *short*, the labels above the zone and then a
//!   pointer to the zone inside the question (only valid when the question
//!   ends in the zone spelled exactly in lower case, which is what hickory's
//!   case-sensitive compression would use too), and *long*, written in full.
//!   SRV targets are never compressed (RFC 2782), as in hickory.
//! - Glue (the additional records of SRV and NS answers) is kept without its
//!   owner: the owner is a pointer to the SRV target or NS host inside the
//!   answer record just written, or the name in full when that record lies
//!   beyond what a pointer can reach.

use hickory_proto::rr::rdata::{NS, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder, NameEncoding};

use crate::index::{Data, SRV_PRIORITY, Target};
use crate::name::key_of;

/// The 2-byte compression pointer to the question's name.
const QUESTION_POINTER: [u8; 2] = [0xC0, 12];

/// Largest offset a compression pointer can reach.
pub(crate) const MAX_POINTER: usize = 0x3FFF;

/// Who owns a record in the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The question's name (every answer record).
    Question,
    /// The zone apex (the SOA in the authority section of a negative
    /// answer, whose question is some name below the apex).
    Zone,
}

/// One record, ready to copy into a response.
#[derive(Debug, Clone)]
pub(crate) struct Chunk {
    /// The short form: names ending in the zone compressed to the zone in the
    /// question; at each offset of `fixups`, two bytes to overwrite with
    /// that pointer.
    short: Box<[u8]>,
    fixups: Box<[u16]>,
    /// The long form, when it differs from the short one.
    long: Option<Box<[u8]>>,
}

impl Chunk {
    /// Length of the form used when the zone sits at `zone_at` in the
    /// question (`None`: not there in lower case).
    pub(crate) fn len(&self, zone_at: Option<u16>) -> usize {
        match (&self.long, zone_at) {
            (Some(long), None) => long.len(),
            _ => self.short.len(),
        }
    }

    /// Appends the record to `out`.
    pub(crate) fn write(&self, out: &mut Vec<u8>, zone_at: Option<u16>) {
        match (&self.long, zone_at) {
            (Some(long), None) => out.extend_from_slice(long),
            (_, zone_at) => {
                let start = out.len();
                out.extend_from_slice(&self.short);
                if let Some(at) = zone_at {
                    let pointer = (0xC000 | at).to_be_bytes();
                    for &f in &self.fixups {
                        let f = start + usize::from(f);
                        out[f..f + 2].copy_from_slice(&pointer);
                    }
                }
            }
        }
    }
}

/// An additional record that comes with an answer record.
#[derive(Debug, Clone)]
pub(crate) struct Glue {
    /// TYPE, CLASS, TTL, RDLENGTH and RDATA: the record without its owner.
    body: Box<[u8]>,
    /// The owner in full, lower case.
    owner: Box<[u8]>,
    /// Where the owner's name starts inside the answer record it comes
    /// with (the same offset in both forms), if it is written there.
    at: Option<u16>,
}

impl Glue {
    /// Length once written after an answer record that starts at `answer_at`.
    pub(crate) fn len(&self, answer_at: usize) -> usize {
        self.body.len() + self.owner_len(answer_at)
    }

    fn pointer(&self, answer_at: usize) -> Option<u16> {
        let at = answer_at + usize::from(self.at?);
        (at <= MAX_POINTER).then_some(at as u16)
    }

    fn owner_len(&self, answer_at: usize) -> usize {
        match self.pointer(answer_at) {
            Some(_) => 2,
            None => self.owner.len(),
        }
    }

    /// Appends the record to `out`.
    pub(crate) fn write(&self, out: &mut Vec<u8>, answer_at: usize) {
        match self.pointer(answer_at) {
            Some(p) => out.extend_from_slice(&(0xC000 | p).to_be_bytes()),
            None => out.extend_from_slice(&self.owner),
        }
        out.extend_from_slice(&self.body);
    }
}

/// A record of the index as the fast path writes it.
#[derive(Debug, Clone)]
pub(crate) struct WireRecord {
    /// The record itself.
    pub(crate) chunk: Chunk,
    /// Its glue, in order.
    pub(crate) glue: Box<[Glue]>,
}

/// Encodes `record` owned by `owner`, or `None` when it cannot be (the
/// fast path then leaves such answers to hickory).
pub(crate) fn encode_record(record: &Record, owner: Owner, zone: &[u8]) -> Option<Chunk> {
    let rdata_long = emit_rdata(record)?;
    let header = |out: &mut Vec<u8>, rdlen: usize| -> Option<()> {
        let rdlen = u16::try_from(rdlen).ok()?;
        fixed(
            out,
            record.record_type(),
            record.dns_class.into(),
            record.ttl,
            rdlen,
        );
        Some(())
    };
    let mut long = Vec::with_capacity(16 + rdata_long.len());
    match owner {
        Owner::Question => long.extend_from_slice(&QUESTION_POINTER),
        Owner::Zone => long.extend_from_slice(zone),
    }
    header(&mut long, rdata_long.len())?;
    long.extend_from_slice(&rdata_long);

    // The short form: only for records with zone names to compress.
    let mut fixups = Vec::new();
    let mut short = Vec::with_capacity(long.len());
    match owner {
        Owner::Question => short.extend_from_slice(&QUESTION_POINTER),
        Owner::Zone => {
            fixups.push(0);
            short.extend_from_slice(&[0, 0]);
        }
    }
    let rdata_short = match &record.data {
        RData::PTR(PTR(name)) | RData::NS(NS(name)) => Some(compress_names(
            &[name],
            &[],
            zone,
            &mut fixups,
            short.len() + 10,
        )),
        RData::SOA(soa) => {
            let mut tail = Vec::with_capacity(20);
            tail.extend_from_slice(&soa.serial.to_be_bytes());
            for v in [soa.refresh, soa.retry, soa.expire] {
                tail.extend_from_slice(&v.to_be_bytes());
            }
            tail.extend_from_slice(&soa.minimum.to_be_bytes());
            Some(compress_names(
                &[&soa.mname, &soa.rname],
                &tail,
                zone,
                &mut fixups,
                short.len() + 10,
            ))
        }
        _ => None,
    };
    match rdata_short {
        None if owner == Owner::Question => Some(Chunk {
            short: long.into(),
            fixups: Box::new([]),
            long: None,
        }),
        None => {
            header(&mut short, rdata_long.len())?;
            short.extend_from_slice(&rdata_long);
            Some(Chunk {
                short: short.into(),
                fixups: fixups.into(),
                long: Some(long.into()),
            })
        }
        Some(rdata_short) => {
            header(&mut short, rdata_short.len())?;
            short.extend_from_slice(&rdata_short);
            Some(Chunk {
                short: short.into(),
                fixups: fixups.into(),
                long: Some(long.into()),
            })
        }
    }
}

/// RDATA holding `names` (each compressed to the zone where it ends in it)
/// then `tail`; records the offsets of the zone pointers, counted from the
/// start of the record, `rdata_at` being where the RDATA starts.
fn compress_names(
    names: &[&Name],
    tail: &[u8],
    zone: &[u8],
    fixups: &mut Vec<u16>,
    rdata_at: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for name in names {
        let key = key_of(name);
        match key.len().checked_sub(zone.len()) {
            Some(prefix) if key[prefix..] == *zone && on_label_boundary(&key, prefix) => {
                out.extend_from_slice(&key[..prefix]);
                fixups.push((rdata_at + out.len()) as u16);
                out.extend_from_slice(&[0, 0]);
            }
            _ => out.extend_from_slice(&key),
        }
    }
    out.extend_from_slice(tail);
    out
}

/// Whether a label starts at `at` in the wire-form `key`.
pub(crate) fn on_label_boundary(key: &[u8], at: usize) -> bool {
    let mut i = 0;
    while i < at {
        i += 1 + usize::from(key[i]);
    }
    i == at
}

/// The RDATA of `record` as hickory encodes it with no compression.
fn emit_rdata(record: &Record) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(32);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_name_encoding(NameEncoding::Uncompressed);
    record.data.emit(&mut encoder).ok()?;
    Some(buf)
}

/// The glue `record` (an address) that comes with `answer`, whose target
/// name it owns.
pub(crate) fn encode_glue(record: &Record, answer: &Record) -> Option<Glue> {
    let rdata = emit_rdata(record)?;
    let mut body = Vec::with_capacity(10 + rdata.len());
    let rdlen = u16::try_from(rdata.len()).ok()?;
    fixed(
        &mut body,
        record.record_type(),
        record.dns_class.into(),
        record.ttl,
        rdlen,
    );
    body.extend_from_slice(&rdata);
    // Owner pointer (2) + type, class, TTL, RDLENGTH (10), then the RDATA.
    let at = match &answer.data {
        RData::SRV(srv) if srv.target.eq_case(&record.name) => Some(12 + 6),
        RData::NS(ns) if ns.0.eq_case(&record.name) => Some(12),
        _ => None,
    };
    Some(Glue {
        body: body.into(),
        owner: key_of(&record.name),
        at,
    })
}

/// TYPE, CLASS, TTL and RDLENGTH.
fn fixed(out: &mut Vec<u8>, rtype: RecordType, class: u16, ttl: u32, rdlen: u16) {
    out.extend_from_slice(&u16::from(rtype).to_be_bytes());
    out.extend_from_slice(&class.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&rdlen.to_be_bytes());
}

/// [`fixed`] for the index's own records, class IN. Their RDATA is far
/// below 64 KiB (an instance is at most 16 KiB); saturate rather than wrap
/// all the same.
fn fixed_in(out: &mut Vec<u8>, rtype: RecordType, ttl: u32, rdlen: usize) {
    let rdlen = u16::try_from(rdlen).unwrap_or(u16::MAX);
    fixed(out, rtype, u16::from(DNSClass::IN), ttl, rdlen);
}

/// A PTR target as written: compressed to the zone in the question when
/// the question holds it (`zone_at`) and the target ends in it.
fn ptr_target(target: &Target, zone_at: Option<u16>) -> (&[u8], Option<u16>) {
    match (zone_at, target.zone_at()) {
        (Some(pointer), Some(prefix)) => (&target.name()[..usize::from(prefix)], Some(pointer)),
        _ => (target.name(), None),
    }
}

impl Data {
    /// Length of the answer record, its owner a pointer to the question;
    /// `None` when the fast path cannot write it.
    pub(crate) fn answer_len(&self, zone_at: Option<u16>) -> Option<usize> {
        let rdlen = match self {
            Data::A(..) => 4,
            Data::Aaaa(..) => 16,
            Data::Srv { target, .. } => 6 + target.name().len(),
            Data::Txt(target) => target.txt().len(),
            Data::Ptr(target) => match ptr_target(target, zone_at) {
                (name, Some(_)) => name.len() + 2,
                (name, None) => name.len(),
            },
            Data::Whole(w) => return w.wire.as_ref().map(|w| w.chunk.len(zone_at)),
        };
        Some(QUESTION_POINTER.len() + 10 + rdlen)
    }

    /// Appends the answer record, its owner a pointer to the question.
    /// Call only when [`Data::answer_len`] is `Some`.
    pub(crate) fn write_answer(&self, out: &mut Vec<u8>, zone_at: Option<u16>, ttl: u32) {
        let rtype = self.record_type();
        match self {
            Data::Whole(w) => {
                if let Some(w) = &w.wire {
                    w.chunk.write(out, zone_at);
                }
                return;
            }
            _ => out.extend_from_slice(&QUESTION_POINTER),
        }
        match self {
            Data::A(ip, _) => {
                fixed_in(out, rtype, ttl, 4);
                out.extend_from_slice(&ip.octets());
            }
            Data::Aaaa(ip, _) => {
                fixed_in(out, rtype, ttl, 16);
                out.extend_from_slice(&ip.octets());
            }
            Data::Srv {
                weight,
                port,
                target,
            } => {
                fixed_in(out, rtype, ttl, 6 + target.name().len());
                out.extend_from_slice(&SRV_PRIORITY.to_be_bytes());
                out.extend_from_slice(&weight.to_be_bytes());
                out.extend_from_slice(&port.to_be_bytes());
                // SRV targets are never compressed (RFC 2782).
                out.extend_from_slice(target.name());
            }
            Data::Txt(target) => {
                let rdata = target.txt();
                fixed_in(out, rtype, ttl, rdata.len());
                out.extend_from_slice(rdata);
            }
            Data::Ptr(target) => {
                let (name, pointer) = ptr_target(target, zone_at);
                fixed_in(out, rtype, ttl, name.len() + pointer.map_or(0, |_| 2));
                out.extend_from_slice(name);
                if let Some(at) = pointer {
                    out.extend_from_slice(&(0xC000 | at).to_be_bytes());
                }
            }
            Data::Whole(_) => {}
        }
    }

    /// Appends the glue of the answer record written at `answer_at`, as
    /// much as fits within `limit`; returns how many records were written
    /// and whether that was all of them, or `None` when the fast path
    /// cannot write them.
    pub(crate) fn write_glue(
        &self,
        out: &mut Vec<u8>,
        answer_at: usize,
        ttl: u32,
        limit: usize,
    ) -> Option<(u16, bool)> {
        match self {
            Data::Srv { target, .. } => {
                // The owner is the target inside the SRV record: after its
                // owner pointer (2), TYPE..RDLENGTH (10) and priority,
                // weight and port (6).
                let owner_at = answer_at + QUESTION_POINTER.len() + 10 + 6;
                let owner_len = if owner_at <= MAX_POINTER {
                    2
                } else {
                    target.name().len()
                };
                let (rtype, address): (RecordType, &[u8]) = match &target.address() {
                    std::net::IpAddr::V4(ip) => (RecordType::A, &ip.octets()[..]),
                    std::net::IpAddr::V6(ip) => (RecordType::AAAA, &ip.octets()[..]),
                };
                if out.len() + owner_len + 10 + address.len() > limit {
                    return Some((0, false));
                }
                if owner_at <= MAX_POINTER {
                    out.extend_from_slice(&(0xC000 | owner_at as u16).to_be_bytes());
                } else {
                    out.extend_from_slice(target.name());
                }
                fixed_in(out, rtype, ttl, address.len());
                out.extend_from_slice(address);
                Some((1, true))
            }
            Data::Whole(w) => {
                let glue = &w.wire.as_ref()?.glue;
                let mut written = 0;
                for g in glue.iter() {
                    if out.len() + g.len(answer_at) > limit {
                        return Some((written, false));
                    }
                    g.write(out, answer_at);
                    written += 1;
                }
                Some((written, true))
            }
            _ => Some((0, true)),
        }
    }
}
