//! Writing the response to a [`Question`] from the index's pre-encoded
//! records, with the same decisions as the hickory path
//! ([`crate::handler`] and [`crate::response`]): the same sets, the same
//! weighted order, the same cut to the UDP size (the whole set or none and
//! TC; under `--udp-answer-limit` that many records or as many as fit, no
//! TC; then the glue that fits), the same flags and the same OPT record.

use hickory_proto::op::{EdnsFlags, HeaderCounts, MessageType, Metadata, ResponseCode};
use hickory_proto::rr::RecordType;
use rand::Rng;

use super::query::{HEADER_LEN, Question};
use crate::index::{Index, RecordSet, Single};
use crate::response::OPT_LEN;
use crate::select::weighted_order_with;

/// What the response depends on besides the question and the index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context {
    /// The server's cap of UDP answers.
    pub(crate) max_udp_payload: u16,
    /// Whether this client may have names outside the zone forwarded (RA).
    pub(crate) recursion: bool,
    /// Records per set under `--udp-answer-limit`; `None`: a set that does
    /// not fit whole is not sent (TC).
    pub(crate) answer_limit: Option<u16>,
}

/// Buffers reused from one query to the next.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    keyed: Vec<(f64, usize)>,
    order: Vec<usize>,
    /// Where each answer record starts in the response.
    at: Vec<usize>,
}

/// Writes into `out` the response to `q` (read from `packet`) and returns
/// its response code, or `None` when hickory must answer (forwarding, or a
/// record the index could not pre-encode).
pub(crate) fn respond<R: Rng + ?Sized>(
    packet: &[u8],
    q: &Question,
    index: &Index,
    cx: Context,
    rng: &mut R,
    scratch: &mut Scratch,
    out: &mut Vec<u8>,
) -> Option<ResponseCode> {
    let (rcode, set) = match index.resolve_single(q.key(), q.qtype) {
        // Ours to forward: the handler's forwarder does it.
        Single::Outside if cx.recursion && q.header.recursion_desired => return None,
        Single::Outside => (ResponseCode::Refused, None),
        Single::NxDomain => (ResponseCode::NXDomain, None),
        Single::Found(set) => (ResponseCode::NoError, set.filter(|s| !s.items.is_empty())),
    };
    let authoritative = rcode != ResponseCode::Refused;

    // The client's size (512 without EDNS), capped by ours, never below 512.
    let client_max = q.edns_payload.map_or(512, |p| p.max(512));
    let mut limit = usize::from(client_max.min(cx.max_udp_payload).max(512));
    if q.edns_payload.is_some() {
        limit -= OPT_LEN;
    }

    out.clear();
    out.extend_from_slice(&packet[..HEADER_LEN]);
    out.extend_from_slice(&packet[HEADER_LEN..q.end]);
    let (mut an, mut ns, mut ar) = (0u16, 0u16, 0u16);
    let mut truncated = false;
    match set {
        Some(set) => {
            let (answers, glue) = write_set(
                set,
                (q.zone_at, index.ttl),
                (limit, cx.answer_limit),
                rng,
                scratch,
                out,
            )?;
            an = answers;
            ar = glue;
            truncated = answers == 0;
        }
        None if rcode == ResponseCode::Refused => {}
        None => {
            let soa = index.soa_wire.as_ref()?;
            if out.len() + soa.len(q.zone_at) <= limit {
                soa.write(out, q.zone_at);
                ns = 1;
            } else {
                truncated = true;
            }
        }
    }
    if q.edns_payload.is_some() {
        // Root owner, type OPT, our payload size, version 0, DO copied
        // back (RFC 3225 §3), no options (RFC 6891 §6.1.1), as the hickory
        // path sends.
        out.push(0);
        out.extend_from_slice(&u16::from(RecordType::OPT).to_be_bytes());
        out.extend_from_slice(&cx.max_udp_payload.max(512).to_be_bytes());
        // The TTL: extended RCODE 0, version 0, then the flags.
        out.extend_from_slice(&[0, 0]);
        let flags = EdnsFlags {
            dnssec_ok: q.dnssec_ok,
            z: 0,
        };
        out.extend_from_slice(&u16::from(flags).to_be_bytes());
        // No RDATA.
        out.extend_from_slice(&[0, 0]);
        ar += 1;
    }

    // The handler's header: RD and CD echoed, AA for the zone's answers,
    // RA for clients that may recurse.
    let mut metadata = Metadata::response_from_request(&q.header);
    metadata.authoritative = authoritative;
    metadata.truncation = truncated;
    metadata.recursion_available = cx.recursion;
    metadata.response_code = rcode;
    let counts = HeaderCounts {
        queries: 1,
        answers: an,
        authorities: ns,
        additionals: ar,
    };
    // Written over the copy of the query's header, in place.
    write_header(out.get_mut(..HEADER_LEN)?, &metadata, &counts);
    Some(rcode)
}

/// Writes a header into `out` (12 bytes) in the layout of hickory's
/// `Header::emit` (RFC 1035 §4.1.1), which `the_header_is_written_as_hickory_emits_it`
/// holds it to. Not through hickory's encoder: that writes field by field
/// through its bounds and offset checks, a cost the fast path would pay on
/// every answer for twelve bytes (README's DNS section has the count).
fn write_header(out: &mut [u8], metadata: &Metadata, counts: &HeaderCounts) {
    let bit = |set: bool, mask: u8| if set { mask } else { 0 };
    out[0..2].copy_from_slice(&metadata.id.to_be_bytes());
    out[2] = bit(metadata.message_type == MessageType::Response, 0x80)
        | u8::from(metadata.op_code) << 3
        | bit(metadata.authoritative, 0x04)
        | bit(metadata.truncation, 0x02)
        | bit(metadata.recursion_desired, 0x01);
    out[3] = bit(metadata.recursion_available, 0x80)
        | bit(metadata.authentic_data, 0x20)
        | bit(metadata.checking_disabled, 0x10)
        | metadata.response_code.low();
    let counts = [
        counts.queries,
        counts.answers,
        counts.authorities,
        counts.additionals,
    ];
    for (at, count) in counts.into_iter().enumerate() {
        out[4 + 2 * at..6 + 2 * at].copy_from_slice(&count.to_be_bytes());
    }
}

/// Writes the records of `set` in a fresh weighted order — all of them, or
/// with `answer_limit` at most that many and as many as fit in `limit` —
/// then the glue that fits; returns the counts of both. When the set does
/// not fit (or not one record does), nothing is written and the caller sets
/// TC.
fn write_set<R: Rng + ?Sized>(
    set: RecordSet<'_>,
    (zone_at, ttl): (Option<u16>, u32),
    (limit, answer_limit): (usize, Option<u16>),
    rng: &mut R,
    scratch: &mut Scratch,
    out: &mut Vec<u8>,
) -> Option<(u16, u16)> {
    let Scratch { keyed, order, at } = scratch;
    weighted_order_with(set.items.iter().map(|i| i.weight()), rng, keyed, order);
    at.clear();
    let start = out.len();
    let most = answer_limit.map_or(usize::MAX, usize::from);
    for &i in order.iter().take(most) {
        let data = &set.items.get(i)?.data;
        if out.len() + data.answer_len(zone_at)? > limit {
            if answer_limit.is_none() {
                // Whole or nothing: the caller sets TC.
                out.truncate(start);
                at.clear();
                return Some((0, 0));
            }
            break;
        }
        at.push(out.len());
        data.write_answer(out, zone_at, ttl);
    }
    // Glue in answer order; stop at the first that does not fit, as the
    // hickory path keeps a prefix of it too.
    let mut glue = 0u16;
    for (&i, &answer_at) in order.iter().zip(at.iter()) {
        let (written, all) = set
            .items
            .get(i)?
            .data
            .write_glue(out, answer_at, ttl, limit)?;
        glue += written;
        if !all {
            break;
        }
    }
    Some((at.len() as u16, glue))
}

#[cfg(test)]
mod header_tests {
    use hickory_proto::op::{Header, OpCode};
    use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};

    use super::*;

    #[test]
    fn the_header_is_written_as_hickory_emits_it() {
        for seed in 0u32..512 {
            let bit = |n: u32| seed >> n & 1 == 1;
            let mut metadata = Metadata::new(
                seed as u16 ^ 0x5a5a,
                if bit(0) {
                    MessageType::Response
                } else {
                    MessageType::Query
                },
                if bit(1) {
                    OpCode::Notify
                } else {
                    OpCode::Query
                },
            );
            metadata.authoritative = bit(2);
            metadata.truncation = bit(3);
            metadata.recursion_desired = bit(4);
            metadata.recursion_available = bit(5);
            metadata.authentic_data = bit(6);
            metadata.checking_disabled = bit(7);
            metadata.response_code = if bit(8) {
                ResponseCode::NXDomain
            } else {
                ResponseCode::Refused
            };
            let counts = HeaderCounts {
                queries: 1,
                answers: seed as u16,
                authorities: 2,
                additionals: 300,
            };
            let mut ours = [0u8; HEADER_LEN];
            write_header(&mut ours, &metadata, &counts);
            let mut theirs = Vec::new();
            Header { metadata, counts }
                .emit(&mut BinEncoder::new(&mut theirs))
                .unwrap();
            assert_eq!(&ours[..], &theirs[..], "seed {seed}");
        }
    }
}
