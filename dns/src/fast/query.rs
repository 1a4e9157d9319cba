//! Reading the common query straight from the datagram.
//!
//! Only the plainest shape is accepted here: a QUERY with one question of
//! class IN in uncompressed labels, no answer or authority records, and at
//! most an EDNS version 0 OPT record carrying no option that hickory would
//! interpret. Anything else, including every malformed packet, is handed to
//! hickory, which already decides what each deserves (FORMERR, NOTIMP,
//! BADVERS, REFUSED, silence). The reader is bounded by the packet and by
//! the 255-byte name limit, and follows no compression pointer, so no input
//! can make it loop.

use hickory_proto::op::{EdnsFlags, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsCode;
use hickory_proto::rr::{DNSClass, RecordType};

use crate::name::MAX_NAME_LEN;

/// DNS header length.
pub(crate) const HEADER_LEN: usize = 12;

/// Record types always left to hickory: ANY (the handler merges every set),
/// zone transfers (the handler's [`crate::transfer`]), and the types that
/// are not data (OPT and TSIG, and MAILA and MAILB, RFC 1035 §3.2.3, which
/// hickory knows only by number).
fn left_to_hickory(qtype: RecordType) -> bool {
    matches!(
        qtype,
        RecordType::ANY
            | RecordType::AXFR
            | RecordType::IXFR
            | RecordType::OPT
            | RecordType::TSIG
            | RecordType::Unknown(253 | 254)
    )
}

/// EDNS options hickory decodes (and may reject): left to it.
fn parsed_by_hickory(option: EdnsCode) -> bool {
    matches!(option, EdnsCode::NSID | EdnsCode::DAU | EdnsCode::Subnet)
}

/// A query the fast path can answer.
#[derive(Clone)]
pub(crate) struct Question {
    /// The question's name, lower case, wire form (an index key).
    key: [u8; MAX_NAME_LEN],
    key_len: usize,
    /// Where the question section ends in the packet.
    pub(crate) end: usize,
    /// The query's header fields (RD and CD are echoed).
    pub(crate) header: Metadata,
    /// The query type.
    pub(crate) qtype: RecordType,
    /// Where the zone starts inside the question's name, when the name ends
    /// in the zone spelled exactly as the zone's lower-case key (the short
    /// forms of [`crate::wire::Chunk`] point there).
    pub(crate) zone_at: Option<u16>,
    /// The client's EDNS payload size, if it sent an OPT record.
    pub(crate) edns_payload: Option<u16>,
    /// Whether the OPT record had DO set (copied back, RFC 3225 §3).
    pub(crate) dnssec_ok: bool,
}

impl Question {
    /// The index key of the question's name.
    pub(crate) fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }
}

/// What to do with a datagram.
// The question stays on the stack: boxing it would allocate per query.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Parsed {
    /// Answer it here.
    Fast(Question),
    /// Let hickory decide.
    Hickory,
    /// Not even a header: hickory would drop it silently too.
    Drop,
}

fn u16_at(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]))
}

/// Reads `packet` for the fast path; `zone` is the zone's key and
/// `zone_labels` its number of labels (the root not counted).
pub(crate) fn parse(packet: &[u8], zone: &[u8], zone_labels: usize) -> Parsed {
    if packet.len() < HEADER_LEN {
        return Parsed::Drop;
    }
    match parse_query(packet, zone, zone_labels) {
        Some(q) => Parsed::Fast(q),
        None => Parsed::Hickory,
    }
}

/// The header at the start of `p`, read as hickory's `Header::read` reads
/// it (RFC 1035 §4.1.1), which `the_header_is_read_as_hickory_reads_it`
/// holds it to; not through hickory's decoder, whose checks per field the
/// fast path would pay on every query for twelve bytes.
fn read_header(p: &[u8]) -> Option<(Metadata, HeaderCounts)> {
    let [a, b] = [*p.get(2)?, *p.get(3)?];
    let message_type = if a & 0x80 == 0 {
        MessageType::Query
    } else {
        MessageType::Response
    };
    let mut metadata = Metadata::new(
        u16_at(p, 0)?,
        message_type,
        OpCode::from_u8((a & 0x78) >> 3),
    );
    metadata.authoritative = a & 0x04 != 0;
    metadata.truncation = a & 0x02 != 0;
    metadata.recursion_desired = a & 0x01 != 0;
    metadata.recursion_available = b & 0x80 != 0;
    metadata.authentic_data = b & 0x20 != 0;
    metadata.checking_disabled = b & 0x10 != 0;
    metadata.response_code = ResponseCode::from_low(b & 0x0F);
    let counts = HeaderCounts {
        queries: u16_at(p, 4)?,
        answers: u16_at(p, 6)?,
        authorities: u16_at(p, 8)?,
        additionals: u16_at(p, 10)?,
    };
    Some((metadata, counts))
}

fn parse_query(p: &[u8], zone: &[u8], zone_labels: usize) -> Option<Question> {
    let (metadata, counts) = read_header(p)?;
    // A query of opcode QUERY; the other flags are echoed or ignored.
    if metadata.message_type != MessageType::Query || metadata.op_code != OpCode::Query {
        return None;
    }
    if counts.queries != 1
        || counts.answers != 0
        || counts.authorities != 0
        || counts.additionals > 1
    {
        return None;
    }

    let mut key = [0u8; MAX_NAME_LEN];
    // Offsets (in the name) of the first byte of every label; a name of at
    // most 255 bytes has at most 127 labels.
    let mut starts = [0u8; MAX_NAME_LEN / 2 + 1];
    let mut labels = 0usize;
    let mut at = HEADER_LEN;
    let mut key_len = 0usize;
    loop {
        let len = usize::from(*p.get(at)?);
        if len == 0 {
            break;
        }
        if len > 63 {
            // Compression pointers (0xC0) and the reserved label types.
            return None;
        }
        // The label, its length byte and the root's zero byte must fit.
        if key_len + 1 + len + 1 > MAX_NAME_LEN {
            return None;
        }
        let label = p.get(at + 1..at + 1 + len)?;
        *starts.get_mut(labels)? = key_len as u8;
        labels += 1;
        key[key_len] = len as u8;
        for (dst, src) in key[key_len + 1..key_len + 1 + len].iter_mut().zip(label) {
            *dst = src.to_ascii_lowercase();
        }
        key_len += 1 + len;
        at += 1 + len;
    }
    key[key_len] = 0;
    key_len += 1;
    at += 1;

    let qtype = RecordType::from(u16_at(p, at)?);
    let qclass = DNSClass::from(u16_at(p, at + 2)?);
    let end = at + 4;
    if qclass != DNSClass::IN || left_to_hickory(qtype) {
        return None;
    }

    let (edns_payload, dnssec_ok) = if counts.additionals == 1 {
        let (payload, dnssec_ok) = parse_opt(p, end)?;
        (Some(payload), dnssec_ok)
    } else if end == p.len() {
        (None, false)
    } else {
        // Trailing bytes: let hickory judge them.
        return None;
    };

    // Where the zone starts in the question, if it is spelled in lower case.
    let zone_at = labels.checked_sub(zone_labels).and_then(|first| {
        let start = if first == labels {
            key_len - 1
        } else {
            usize::from(starts[first])
        };
        let name = &p[HEADER_LEN..HEADER_LEN + key_len];
        (name.get(start..) == Some(zone)).then_some((HEADER_LEN + start) as u16)
    });

    Some(Question {
        key,
        key_len,
        end,
        header: metadata,
        qtype,
        zone_at,
        edns_payload,
        dnssec_ok,
    })
}

/// Reads the OPT record at `at`, which must end the packet, and returns the
/// payload size it offers and its DO bit.
fn parse_opt(p: &[u8], at: usize) -> Option<(u16, bool)> {
    // Root owner, type OPT.
    if *p.get(at)? != 0 || RecordType::from(u16_at(p, at + 1)?) != RecordType::OPT {
        return None;
    }
    let payload = u16_at(p, at + 3)?;
    // Extended RCODE and version must be 0: a version above 0 gets BADVERS
    // from hickory.
    if *p.get(at + 5)? != 0 || *p.get(at + 6)? != 0 {
        return None;
    }
    let rdlen = usize::from(u16_at(p, at + 9)?);
    let mut opt = at + 11;
    let rdata_end = opt + rdlen;
    if rdata_end != p.len() {
        return None;
    }
    while opt < rdata_end {
        let code = u16_at(p, opt)?;
        let len = usize::from(u16_at(p, opt + 2)?);
        if parsed_by_hickory(EdnsCode::from(code)) {
            return None;
        }
        opt += 4 + len;
    }
    // The low half of the OPT record's TTL.
    let dnssec_ok = EdnsFlags::from(u16_at(p, at + 7)?).dnssec_ok;
    (opt == rdata_end).then_some((payload, dnssec_ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONE: &[u8] = b"\x07xingren\x04host\x00";

    fn query(name: &[u8], qtype: u16, opt: Option<&[u8]>) -> Vec<u8> {
        let mut p = vec![
            0xAB,
            0xCD,
            0x01,
            0x00,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            u8::from(opt.is_some()),
        ];
        p.extend_from_slice(name);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&[0, 1]);
        if let Some(opt) = opt {
            p.extend_from_slice(opt);
        }
        p
    }

    fn fast(p: &[u8]) -> Question {
        match parse(p, ZONE, 2) {
            Parsed::Fast(q) => q,
            _ => panic!("not fast: {p:?}"),
        }
    }

    fn hickory(p: &[u8]) -> bool {
        matches!(parse(p, ZONE, 2), Parsed::Hickory)
    }

    #[test]
    fn plain_query_is_read() {
        let p = query(b"\x04User\x07xingren\x04host\x00", 1, None);
        let q = fast(&p);
        assert_eq!(q.key(), b"\x04user\x07xingren\x04host\x00");
        assert_eq!(q.qtype, RecordType::A);
        assert_eq!(q.end, p.len());
        assert_eq!(q.zone_at, Some(12 + 5));
        assert_eq!(q.edns_payload, None);
    }

    #[test]
    fn zone_position_needs_lower_case_and_label_alignment() {
        let q = fast(&query(b"\x04user\x07XINGREN\x04host\x00", 1, None));
        assert_eq!(q.zone_at, None);
        let q = fast(&query(b"\x07xingren\x04host\x00", 6, None));
        assert_eq!(q.zone_at, Some(12));
        let q = fast(&query(b"\x04host\x00", 1, None));
        assert_eq!(q.zone_at, None);
        let q = fast(&query(b"\x00", 1, None));
        assert_eq!(q.zone_at, None);
        assert_eq!(q.key(), b"\x00");
    }

    #[test]
    fn edns_payload_is_read() {
        let opt = [0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 0];
        let q = fast(&query(b"\x01a\x00", 1, Some(&opt)));
        assert_eq!(q.edns_payload, Some(4096));
        assert!(q.dnssec_ok);
        let opt = [0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0];
        assert!(!fast(&query(b"\x01a\x00", 1, Some(&opt))).dnssec_ok);
        // A cookie option is fine.
        let opt = [
            0, 0, 41, 4, 0xD0, 0, 0, 0, 0, 0, 12, 0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8,
        ];
        assert_eq!(
            fast(&query(b"\x01a\x00", 1, Some(&opt))).edns_payload,
            Some(1232)
        );
    }

    #[test]
    fn unusual_queries_go_to_hickory() {
        let name = b"\x04user\x07xingren\x04host\x00";
        // ANY, AXFR.
        assert!(hickory(&query(name, 255, None)));
        assert!(hickory(&query(name, 252, None)));
        // Class CH.
        let mut p = query(name, 16, None);
        let n = p.len();
        p[n - 1] = 3;
        assert!(hickory(&p));
        // NOTIFY, a response, two questions, an answer record.
        for (at, v) in [(2, 0x20), (2, 0x80), (5, 2), (7, 1)] {
            let mut p = query(name, 1, None);
            p[at] |= v;
            assert!(hickory(&p), "byte {at} = {v:#x}");
        }
        // EDNS version 1, a client subnet option, a truncated option.
        assert!(hickory(&query(
            name,
            1,
            Some(&[0, 0, 41, 4, 0xD0, 0, 1, 0, 0, 0, 0])
        )));
        assert!(hickory(&query(
            name,
            1,
            Some(&[0, 0, 41, 4, 0xD0, 0, 0, 0, 0, 0, 4, 0, 8, 0, 0])
        )));
        assert!(hickory(&query(
            name,
            1,
            Some(&[0, 0, 41, 4, 0xD0, 0, 0, 0, 0, 0, 6, 0, 10, 0, 8, 1, 2])
        )));
        // Trailing bytes.
        let mut p = query(name, 1, None);
        p.push(0);
        assert!(hickory(&p));
        // A compression pointer in the question.
        assert!(hickory(&query(b"\x01a\xC0\x0C", 1, None)));
    }

    #[test]
    fn hostile_names_never_break_the_reader() {
        assert!(matches!(parse(&[0; 11], ZONE, 2), Parsed::Drop));
        // Truncated everywhere.
        let p = query(b"\x04user\x07xingren\x04host\x00", 1, None);
        for n in 12..p.len() {
            assert!(hickory(&p[..n]), "{n}");
        }
        // A label running past the end.
        assert!(hickory(&query(b"\x3Fab", 1, None)));
        // 127 one-byte labels fit in 255 bytes; 128 do not.
        for (labels, ok) in [(127, true), (128, false), (300, false)] {
            let mut name = Vec::new();
            for _ in 0..labels {
                name.extend_from_slice(b"\x01a");
            }
            name.push(0);
            let p = query(&name, 1, None);
            assert_eq!(
                matches!(parse(&p, ZONE, 2), Parsed::Fast(_)),
                ok,
                "{labels}"
            );
        }
        // Every label length and a few lengths of garbage.
        for first in 0..=255u8 {
            let mut p = query(b"", 1, None);
            p.truncate(12);
            p.extend_from_slice(&[first, b'x', b'y', 0, 0, 1, 0, 1]);
            let _ = parse(&p, ZONE, 2);
        }
    }
}

#[cfg(test)]
mod header_tests {
    use hickory_proto::op::Header;
    use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

    use super::*;

    #[test]
    fn the_header_is_read_as_hickory_reads_it() {
        for seed in 0u32..4096 {
            let p = [
                (seed >> 8) as u8,
                seed as u8,
                (seed * 37) as u8,
                ((seed * 101) >> 3) as u8,
                0,
                1,
                0,
                (seed & 3) as u8,
                (seed >> 2 & 1) as u8,
                0,
                0,
                (seed >> 3 & 1) as u8,
            ];
            let theirs = Header::read(&mut BinDecoder::new(&p)).unwrap();
            let ours = read_header(&p).unwrap();
            assert_eq!(ours.0, theirs.metadata, "{p:?}");
            assert_eq!(ours.1, theirs.counts, "{p:?}");
        }
    }
}
