//! Turning a resolution into the sections of a response, and fitting them
//! into a UDP payload.
//!
//! Fitting follows CONTRACT.md. Over UDP an answer is whole or not sent:
//! when its records do not all fit, TC tells the client to ask again over
//! TCP (RFC 2181 §9), so that no stub or cache takes part of a set for all
//! of it. Over TCP, and over UDP under `--udp-answer-limit`, as many answer
//! records as fit, in the weighted order of [`crate::select`] (so the ones
//! kept follow the weights), without TC. Either way the glue that fits
//! follows, for kept answers only.

use std::iter;

use hickory_proto::op::{MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{Name, Record};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use rand::Rng;

use crate::index::{Index, Resolution, encoded_len};
use crate::select::weighted_order;

/// Size of the DNS header.
const HEADER_LEN: usize = 12;

/// Size of the OPT record this server sends: root name, type, class, TTL
/// and an empty RDATA (no options).
pub(crate) const OPT_LEN: usize = 11;

/// How an answer too large for its message is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fit {
    /// All the answer records or none, with TC.
    Whole,
    /// As many answer records as fit, in order, without TC.
    AsManyAsFit,
}

/// The sections of one response, before encoding.
#[derive(Debug, Clone, Default)]
pub(crate) struct Answer {
    /// Response code.
    pub(crate) rcode: ResponseCode,
    /// Whether the answer comes from the zone's data (AA).
    pub(crate) authoritative: bool,
    /// Whether the answer had to be cut (TC).
    pub(crate) truncated: bool,
    /// Answer section.
    pub(crate) answers: Vec<Record>,
    /// Authority section.
    pub(crate) authorities: Vec<Record>,
    /// Additional section (without OPT, which the encoder adds).
    pub(crate) additionals: Vec<Record>,
    /// For each additional record, the answer it came with: glue is kept in
    /// answer order, so the glue of the first `n` answers is a prefix.
    glue_owner: Vec<usize>,
    /// Upper bound of the encoded size of the three sections.
    records_len: usize,
}

impl Answer {
    /// The answer to a resolution from `index`, or `None` when the name is
    /// not ours. Answer records take `qname` as owner: the name exactly as
    /// the client wrote it, so a client that randomised its case (0x20)
    /// sees it echoed.
    pub(crate) fn from_index<R: Rng + ?Sized>(
        resolution: &Resolution<'_>,
        index: &Index,
        qname: &Name,
        rng: &mut R,
    ) -> Option<Self> {
        let sets = match resolution {
            Resolution::Outside => return None,
            Resolution::NxDomain => {
                return Some(Self::negative(ResponseCode::NXDomain, index));
            }
            Resolution::Found { sets, .. } if sets.iter().all(|s| s.items.is_empty()) => {
                return Some(Self::negative(ResponseCode::NoError, index));
            }
            Resolution::Found { sets, .. } => sets,
        };
        let mut answer = Self {
            authoritative: true,
            ..Self::default()
        };
        let mut weights = Vec::new();
        let mut order = Vec::new();
        let owner_len = qname.iter().map(|l| l.len() + 1).sum::<usize>() + 1;
        for set in sets {
            weights.clear();
            weights.extend(set.items.iter().map(|i| i.weight()));
            weighted_order(&weights, rng, &mut order);
            for &i in &order {
                let data = &set.items[i].data;
                let owner = answer.answers.len();
                answer.answers.push(data.record(qname, index.ttl));
                for glue in data.glue(index.ttl) {
                    answer.additionals.push(glue);
                    answer.glue_owner.push(owner);
                }
                answer.records_len += data.wire_len(owner_len);
            }
        }
        Some(answer)
    }

    /// NXDOMAIN or NODATA: no answer, the SOA in authority (RFC 2308 §3).
    fn negative(rcode: ResponseCode, index: &Index) -> Self {
        Self {
            rcode,
            authoritative: true,
            authorities: vec![index.soa.clone()],
            records_len: index.soa_len,
            ..Self::default()
        }
    }

    /// An answer relayed from an upstream resolver.
    pub(crate) fn relayed(
        rcode: ResponseCode,
        answers: Vec<Record>,
        authorities: Vec<Record>,
    ) -> Self {
        let records_len = answers.iter().chain(&authorities).map(encoded_len).sum();
        Self {
            rcode,
            answers,
            authorities,
            records_len,
            ..Self::default()
        }
    }

    /// An answer with only a response code.
    pub(crate) fn error(rcode: ResponseCode) -> Self {
        Self {
            rcode,
            ..Self::default()
        }
    }

    /// Keeps the first `n` answer records (the heaviest draw: they are in
    /// weighted order) and their glue.
    pub(crate) fn keep_answers(&mut self, n: usize) {
        if n < self.answers.len() {
            self.answers.truncate(n);
            let glue = self.glue_owner.partition_point(|&owner| owner < n);
            self.additionals.truncate(glue);
            self.glue_owner.truncate(glue);
        }
    }

    /// Cuts the answer to `limit` bytes (the whole message except the OPT
    /// record) as `how` says, encoding with `queries` as the question
    /// section the way the server will. Most answers are far below the
    /// limit and skip the trial encodes thanks to the precomputed upper
    /// bound.
    pub(crate) fn fit(&mut self, queries: &Queries, limit: usize, how: Fit) {
        if HEADER_LEN + queries.as_bytes().len() + self.records_len <= limit {
            return;
        }
        let Some(first) = self.trial(queries, limit) else {
            return;
        };
        if !first.truncation {
            return;
        }
        let kept_answers = usize::from(first.answers);
        if kept_answers < self.answers.len() {
            if kept_answers == 0 || how == Fit::Whole {
                // Not all records fit: say so, and let the client ask again
                // over TCP (RFC 2181 §9).
                self.truncated = true;
                self.answers.clear();
                self.authorities.clear();
                self.additionals.clear();
                self.glue_owner.clear();
                return;
            }
            self.answers.truncate(kept_answers);
            let glue = self
                .glue_owner
                .partition_point(|&owner| owner < kept_answers);
            self.additionals.truncate(glue);
            self.glue_owner.truncate(glue);
        }
        if usize::from(first.authorities) < self.authorities.len() && self.answers.is_empty() {
            // A negative answer whose SOA does not fit (a question near
            // 255 bytes and a 512-byte limit cannot do this, but be exact).
            self.truncated = true;
            self.authorities.clear();
        }
        // The answer section now fits; keep as much glue as fits after it.
        // Missing glue costs the client one more query, never correctness.
        if let Some(second) = self.trial(queries, limit)
            && second.truncation
        {
            let glue = usize::from(second.additionals);
            self.additionals.truncate(glue);
            self.glue_owner.truncate(glue);
            let authorities = usize::from(second.authorities);
            self.authorities.truncate(authorities);
        }
    }

    /// Encodes the response at most `limit` bytes long and returns the
    /// counts of what fitted and whether anything was left out.
    fn trial(&self, queries: &Queries, limit: usize) -> Option<TrialCounts> {
        let mut buf = Vec::with_capacity(limit.min(4096));
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(u16::try_from(limit).unwrap_or(u16::MAX));
        let response = MessageResponseBuilder::new(queries, None).build(
            Metadata::new(0, MessageType::Response, OpCode::Query),
            self.answers.iter(),
            self.authorities.iter(),
            iter::empty(),
            self.additionals.iter(),
        );
        let info = response.destructive_emit(&mut encoder).ok()?;
        let counts = info.counts();
        Some(TrialCounts {
            truncation: info.truncation,
            answers: counts.answers,
            authorities: counts.authorities,
            additionals: counts.additionals,
        })
    }
}

/// What a trial encode kept.
struct TrialCounts {
    truncation: bool,
    answers: u16,
    authorities: u16,
    additionals: u16,
}
