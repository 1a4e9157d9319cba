//! Writing the response to a [`Question`] from the index's pre-encoded
//! records, with the same decisions as the hickory path
//! ([`crate::handler`] and [`crate::response`]): the same sets, the same
//! weighted order, the same cut to the UDP size (the whole set or none and
//! TC; under `--udp-answer-limit` that many records or as many as fit, no
//! TC; then the glue that fits), the same flags and the same OPT record.

use hickory_proto::rr::RecordType;
use rand::Rng;

use super::query::{HEADER_LEN, Question};
use crate::index::{Index, RecordSet, Single};
use crate::response::OPT_LEN;
use crate::select::weighted_order_with;

const NOERROR: u16 = 0;
const NXDOMAIN: u16 = 3;
const REFUSED: u16 = 5;

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
) -> Option<u16> {
    let rd = packet[2] & 0x01 != 0;
    let (rcode, set) = match index.resolve_single(q.key(), RecordType::from(q.qtype)) {
        // Ours to forward: hickory's resolver does it.
        Single::Outside if cx.recursion && rd => return None,
        Single::Outside => (REFUSED, None),
        Single::NxDomain => (NXDOMAIN, None),
        Single::Found(set) => (NOERROR, set.filter(|s| !s.items.is_empty())),
    };
    let authoritative = rcode != REFUSED;

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
        None if rcode == REFUSED => {}
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
        out.extend_from_slice(&[0, 0, 41]);
        out.extend_from_slice(&cx.max_udp_payload.max(512).to_be_bytes());
        let flags = if q.dnssec_ok { 0x80 } else { 0 };
        out.extend_from_slice(&[0, 0, flags, 0, 0, 0]);
        ar += 1;
    }

    // QR, opcode QUERY, AA, TC, RD echoed; RA, CD echoed, RCODE.
    out[2] = 0x80
        | if authoritative { 0x04 } else { 0 }
        | if truncated { 0x02 } else { 0 }
        | (packet[2] & 0x01);
    out[3] = if cx.recursion { 0x80 } else { 0 } | (packet[3] & 0x10) | rcode as u8;
    out[4..6].copy_from_slice(&1u16.to_be_bytes());
    out[6..8].copy_from_slice(&an.to_be_bytes());
    out[8..10].copy_from_slice(&ns.to_be_bytes());
    out[10..12].copy_from_slice(&ar.to_be_bytes());
    Some(rcode)
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
