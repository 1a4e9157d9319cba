//! The request handler hickory's server calls for every decoded query.
//!
//! It decides, in this order: unsupported requests (opcode, several
//! questions, EDNS version, zone transfers, classes other than IN) get their
//! error code; names the index knows are answered from it; other names are
//! forwarded when the client asked for recursion (RD) and may have it;
//! everything else is REFUSED.

use std::iter;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use ipnet::IpNet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::forward::Forwarder;
use crate::index::{Index, ZoneConfig};
use crate::metrics::Metrics;
use crate::name::KeyBuf;
use crate::response::{Answer, Fit, OPT_LEN};
use crate::select::with_rng;

/// State shared by every receive loop and the snapshot watcher.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The index of the latest snapshot.
    pub(crate) index: ArcSwap<Index>,
    /// The zone's fixed settings.
    pub(crate) zone: ZoneConfig,
    /// Who may have names outside the zone resolved.
    pub(crate) allow_recursion: Vec<IpNet>,
    /// The upstream resolvers, if forwarding is on.
    pub(crate) forwarder: Option<Forwarder>,
    /// Metrics.
    pub(crate) metrics: Metrics,
    /// Cap of UDP answers.
    pub(crate) max_udp_payload: u16,
    /// Records per set over UDP under `--udp-answer-limit`.
    pub(crate) udp_answer_limit: Option<u16>,
    /// Who gets answers at all; `None` is everyone.
    pub(crate) allow_query: Option<Vec<IpNet>>,
}

impl Shared {
    /// Whether `ip` gets answers (`--allow-query`); others get REFUSED.
    pub(crate) fn may_query(&self, ip: std::net::IpAddr) -> bool {
        self.allow_query
            .as_ref()
            .is_none_or(|nets| nets.iter().any(|n| n.contains(&ip)))
    }

    /// Whether `ip` may have names outside the zone resolved.
    pub(crate) fn may_recurse(&self, ip: std::net::IpAddr) -> bool {
        self.forwarder.is_some() && self.allow_recursion.iter().any(|n| n.contains(&ip))
    }
}

/// hickory's view of the server: one handler shared by every socket.
#[derive(Debug, Clone)]
pub(crate) struct Handler(pub(crate) Arc<Shared>);

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let start = Instant::now();
        let qtype = match request.queries.queries() {
            [q] => Some(q.query_type()),
            _ => None,
        };
        let span = tracing::debug_span!(
            "dns_query",
            id = request.metadata.id,
            src = %request.src(),
            proto = %request.protocol(),
            qtype = ?qtype,
        );
        let info = self
            .respond(request, response_handle)
            .instrument(span)
            .await;
        self.0
            .metrics
            .query(qtype, info.response_code, start.elapsed());
        info
    }
}

impl Handler {
    async fn respond<R: ResponseHandler>(&self, request: &Request, mut handle: R) -> ResponseInfo {
        let shared = &*self.0;
        let src = request.src().ip();
        let recursion = shared.may_recurse(src);
        let mut answer = self.answer(request, recursion).await;

        // Answer EDNS with EDNS (RFC 6891 §6.1.1), advertising our cap.
        let edns = request.edns.as_ref().map(|_| {
            let mut edns = Edns::new();
            edns.set_max_payload(shared.max_udp_payload.max(512));
            edns
        });
        let opt = if edns.is_some() { OPT_LEN } else { 0 };
        if request.protocol() == Protocol::Udp {
            let client_max = request.max_payload();
            let limit = usize::from(client_max.min(shared.max_udp_payload).max(512));
            match shared.udp_answer_limit {
                Some(n) => {
                    answer.keep_answers(usize::from(n));
                    answer.fit(&request.queries, limit - opt, Fit::AsManyAsFit);
                }
                None => answer.fit(&request.queries, limit - opt, Fit::Whole),
            }
        } else {
            // One message over TCP holds at most 64 KiB (RFC 1035 §4.2.2):
            // a service of thousands of instances answers as many as fit,
            // in weighted order.
            answer.fit(
                &request.queries,
                usize::from(u16::MAX) - opt,
                Fit::AsManyAsFit,
            );
        }

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = answer.rcode;
        metadata.authoritative = answer.authoritative;
        metadata.truncation = answer.truncated;
        metadata.recursion_available = recursion;
        tracing::debug!(
            rcode = %answer.rcode,
            answers = answer.answers.len(),
            tc = answer.truncated,
            "answer"
        );
        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            metadata,
            answer.answers.iter(),
            answer.authorities.iter(),
            iter::empty(),
            answer.additionals.iter(),
        );
        match handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, "cannot send response");
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }

    /// The answer to `request`, before fitting it to the transport.
    async fn answer(&self, request: &Request, recursion: bool) -> Answer {
        let shared = &*self.0;
        if !shared.may_query(request.src().ip()) {
            return Answer::error(ResponseCode::Refused);
        }
        if request.metadata.op_code != OpCode::Query {
            return Answer::error(ResponseCode::NotImp);
        }
        let [query] = request.queries.queries() else {
            // RFC 9619: exactly one question.
            return Answer::error(ResponseCode::FormErr);
        };
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return Answer::error(ResponseCode::BADVERS);
        }
        let qtype = query.query_type();
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            // The zone is the catalog: read it from the HTTP API.
            return Answer::error(ResponseCode::Refused);
        }
        if query.query_class() != DNSClass::IN {
            return Answer::error(ResponseCode::Refused);
        }
        let original = query.original();
        let Some(key) = KeyBuf::from_name(original.name()) else {
            return Answer::error(ResponseCode::FormErr);
        };
        {
            // The guard is dropped before any await below.
            let index = shared.index.load();
            if !index.loaded && shared.zone.origin.zone_of(original.name()) {
                // Never synced: "no such name" would be a lie that clients
                // cache; SERVFAIL sends them to another server or a retry.
                return Answer::error(ResponseCode::ServFail);
            }
            let resolution = index.resolve(key.as_bytes(), qtype);
            if let Some(answer) =
                with_rng(|rng| Answer::from_index(&resolution, &index, original.name(), rng))
            {
                return answer;
            }
        }
        match &shared.forwarder {
            Some(forwarder) if recursion && request.metadata.recursion_desired => {
                let forwarded = forwarder.forward(original).await;
                shared.metrics.forwarded(forwarded.result);
                Answer::relayed(forwarded.rcode, forwarded.answers, forwarded.authorities)
            }
            // Not ours, and not to be resolved for this client: an open
            // resolver would be an amplifier.
            _ => Answer::error(ResponseCode::Refused),
        }
    }
}
