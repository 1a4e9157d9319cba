//! Zone transfers out of the live registry: AXFR (RFC 5936) and IXFR (RFC
//! 1995) over TCP, so that any secondary (BIND, Knot, PowerDNS, a cloud
//! DNS) can serve the zone with Signpost as its hidden primary.
//!
//! The zone sent is exactly what queries answer ([`Index::zone_names`]):
//! every record of every name, healthy instances only where queries list
//! healthy instances, no weighted subset. The SOA serial is the catalog
//! revision ([`Index::serial`]), so every replica gives the same serial to
//! the same content.
//!
//! IXFR answers the difference between the client's serial and now, worked
//! out from the indexes of the last [`RETAINED`] snapshots (which share
//! everything unchanged with the current one): only the services the
//! catalog changed in between are compared. A serial no longer kept gets
//! the whole zone, as RFC 1995 §4 allows. Only clients in
//! `--allow-transfer` may transfer; the others are REFUSED.

use std::collections::{HashMap, VecDeque};
use std::iter;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use hickory_proto::serialize::binary::{
    BinDecodable, BinDecoder, BinEncodable, BinEncoder, NameEncoding,
};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use ipnet::IpNet;
use tokio::sync::watch;

use crate::index::{Index, ZoneName, name_of};

/// Snapshots kept for IXFR (only with `--allow-transfer` set). Each shares
/// its unchanged services with the next, so keeping them costs the changed
/// services' old parts; a secondary told by NOTIFY is one or two changes
/// behind, and one further behind gets the whole zone.
pub(crate) const RETAINED: usize = 16;

/// Upper bound of the records of one transfer message. A TCP message holds
/// 64 KiB; the bound leaves room for the header, question and OPT, and
/// counts every name uncompressed, so a message never overflows.
const MESSAGE_BUDGET: usize = 60_000;

/// Transfer settings and the snapshots kept for IXFR.
#[derive(Debug)]
pub(crate) struct Transfers {
    /// Clients allowed to transfer the zone.
    allow: Vec<IpNet>,
    /// Indexes by serial, oldest first; the last is the current one.
    history: Mutex<VecDeque<(u32, Arc<Index>)>>,
    /// The current serial, watched by the NOTIFY sender.
    serial: watch::Sender<u32>,
}

impl Transfers {
    /// Transfers for the clients in `allow` (none: every transfer is
    /// REFUSED and no snapshot is kept).
    pub(crate) fn new(allow: Vec<IpNet>) -> Self {
        Self {
            allow,
            history: Mutex::new(VecDeque::new()),
            serial: watch::Sender::new(0),
        }
    }

    /// Whether `ip` may transfer the zone.
    pub(crate) fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|n| n.contains(&ip))
    }

    /// Takes note of the index now answered from: kept for IXFR, and its
    /// serial told to the NOTIFY sender when it changed.
    pub(crate) fn published(&self, index: &Arc<Index>) {
        let serial = index.serial();
        if !self.allow.is_empty()
            && let Ok(mut history) = self.history.lock()
        {
            // The same serial again (a resync at one revision) replaces
            // its index: the newest build is what queries answer.
            if history.back().is_some_and(|(s, _)| *s == serial) {
                history.pop_back();
            }
            history.push_back((serial, index.clone()));
            while history.len() > RETAINED {
                history.pop_front();
            }
        }
        self.serial.send_if_modified(|current| {
            let changed = *current != serial;
            *current = serial;
            changed
        });
    }

    /// Follows the current serial.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u32> {
        self.serial.subscribe()
    }

    /// The index kept for `serial`, if any.
    fn retained(&self, serial: u32) -> Option<Arc<Index>> {
        let history = self.history.lock().ok()?;
        history
            .iter()
            .rev()
            .find(|(s, _)| *s == serial)
            .map(|(_, index)| index.clone())
    }
}

/// Whether serial `a` is newer than `b` in RFC 1982 arithmetic.
pub(crate) fn serial_newer(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < (1 << 31)
}

/// Answers an AXFR or IXFR `request` for the zone of `index`.
///
/// hickory-server answers a TCP connection's requests one at a time on the
/// task that also writes its responses, and queues at most a few responses
/// per connection: a transfer of many messages cannot be sent from inside
/// the handler, or it would wait for a writer that only runs once the
/// handler returns. So the refusals and single-SOA answers are sent here,
/// and a transfer proper is handed to a task of its own, which sends as
/// the connection drains, while the handler returns.
pub(crate) async fn respond<R: ResponseHandler>(
    transfers: &Transfers,
    index: Arc<Index>,
    request: &Request,
    edns: Option<Edns>,
    handle: R,
) -> ResponseInfo {
    let Some(mut out) = Sender::new(request, edns, handle) else {
        return ResponseInfo::from(Header {
            metadata: Metadata::response_from_request(&request.metadata),
            counts: HeaderCounts::default(),
        });
    };
    let Some(query) = request.queries.queries().first() else {
        return out.error(ResponseCode::FormErr).await;
    };
    let qtype = query.query_type();
    let asked = crate::name::KeyBuf::from_name(query.original().name());
    if asked.as_ref().map(|k| k.as_bytes()) != Some(&index.origin_key[..]) {
        // Not our zone: we are not its authority (RFC 5936 §2.2.1).
        return out.error(ResponseCode::NotAuth).await;
    }
    let src = request.src().ip();
    if !transfers.allowed(src) {
        tracing::info!(client = %src, qtype = %qtype, "zone transfer refused: not in --allow-transfer");
        return out.error(ResponseCode::Refused).await;
    }
    let soa = soa_of(&index);
    if request.protocol() != Protocol::Tcp {
        return match qtype {
            // RFC 1995 §2: over UDP, the SOA alone tells the client to come
            // back over TCP when it is behind.
            RecordType::IXFR => {
                out.push(soa, 0).await;
                out.finish().await
            }
            _ => out.error(ResponseCode::Refused).await,
        };
    }
    let client_serial = request.authorities.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some(soa.serial),
        _ => None,
    });
    let current = index.serial();
    let mut from = None;
    if qtype == RecordType::IXFR
        && let Some(serial) = client_serial
    {
        if serial == current || serial_newer(serial, current) {
            // Up to date (or ahead of this replica): the SOA alone.
            out.push(soa, 0).await;
            return out.finish().await;
        }
        from = transfers.retained(serial);
        match &from {
            Some(_) => tracing::info!(client = %src, from = serial, to = current, "IXFR"),
            None => {
                tracing::info!(client = %src, from = serial, to = current, "IXFR of a serial not kept: sending the whole zone")
            }
        }
    } else {
        tracing::info!(client = %src, serial = current, "AXFR");
    }
    let metadata = out.metadata(ResponseCode::NoError);
    tokio::spawn(async move {
        match from {
            Some(old) => incremental(&mut out, &old, &index, soa).await,
            None => whole(&mut out, &index, soa).await,
        }
        out.finish().await;
    });
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

/// The SOA as the zone holds it (the positive TTL, as `Z SOA` answers).
fn soa_of(index: &Index) -> Record {
    let mut soa = index.soa.clone();
    soa.ttl = index.ttl;
    soa
}

/// The whole zone, between two SOAs (RFC 5936 §2.2).
async fn whole<R: ResponseHandler>(out: &mut Sender<R>, index: &Index, soa: Record) {
    out.push(soa.clone(), 0).await;
    for (key, node) in index.zone_names() {
        let owner = name_of(&key);
        for set in node.sets() {
            if set.rtype == RecordType::SOA {
                continue;
            }
            for item in set.items {
                let len = item.data.wire_len(key.len());
                out.push(item.data.record(&owner, index.ttl), len).await;
            }
        }
        if out.failed() {
            return;
        }
    }
    out.push(soa, 0).await;
}

/// The condensed difference from `old` to `new` (RFC 1995 §4): the new
/// SOA, the old SOA and the records gone, the new SOA and the records
/// added, the new SOA.
async fn incremental<R: ResponseHandler>(
    out: &mut Sender<R>,
    old: &Index,
    new: &Index,
    soa: Record,
) {
    let (before, after) = new.changed_names(old);
    let before = records(&before, old.ttl);
    let after = records(&after, new.ttl);
    let mut gone: Vec<(&Vec<u8>, &Record)> = before
        .iter()
        .filter(|(k, _)| !after.contains_key(*k))
        .collect();
    let mut added: Vec<(&Vec<u8>, &Record)> = after
        .iter()
        .filter(|(k, _)| !before.contains_key(*k))
        .collect();
    gone.sort_unstable_by_key(|(k, _)| *k);
    added.sort_unstable_by_key(|(k, _)| *k);
    out.push(soa.clone(), 0).await;
    out.push(soa_of(old), 0).await;
    for (k, r) in gone {
        out.push(r.clone(), k.len()).await;
    }
    out.push(soa.clone(), 0).await;
    for (k, r) in added {
        out.push(r.clone(), k.len()).await;
    }
    out.push(soa, 0).await;
}

/// The records of `names` (SOA aside) by their uncompressed wire form,
/// which tells two records apart exactly as a secondary does.
fn records(names: &[ZoneName<'_>], ttl: u32) -> HashMap<Vec<u8>, Record> {
    let mut out = HashMap::new();
    for (key, node) in names {
        let owner = name_of(key);
        for set in node.sets() {
            if set.rtype == RecordType::SOA {
                continue;
            }
            for item in set.items {
                let record = item.data.record(&owner, ttl);
                let mut bytes = Vec::with_capacity(64);
                let mut encoder = BinEncoder::new(&mut bytes);
                encoder.set_name_encoding(NameEncoding::Uncompressed);
                if record.emit(&mut encoder).is_ok() {
                    out.insert(bytes, record);
                }
            }
        }
    }
    out
}

/// How long a transfer waits for its connection to take the next message
/// (a client that stopped reading, or went away) before it gives up: the
/// server's TCP idle timeout.
const STALL_LIMIT: Duration = crate::config::DEFAULT_TCP_IDLE_TIMEOUT;

/// Sends a transfer's records in as few messages as fit.
struct Sender<R> {
    handle: R,
    /// The question, echoed in every message (RFC 5936 §2.2.1 allows it).
    queries: Queries,
    /// The request's header fields the responses copy.
    request_meta: Metadata,
    edns: Option<Edns>,
    batch: Vec<Record>,
    /// Upper bound of the batch's encoded size.
    batch_len: usize,
    /// What the last message sent said; `None` before the first.
    info: Option<Result<ResponseInfo, ()>>,
}

impl<R: ResponseHandler> Sender<R> {
    /// A sender of responses to `request`, or `None` if its question
    /// cannot be read again (it was read once, so it can).
    fn new(request: &Request, edns: Option<Edns>, handle: R) -> Option<Self> {
        let mut decoder = BinDecoder::new(request.as_slice());
        let header = Header::read(&mut decoder).ok()?;
        let queries = Queries::read(&mut decoder, usize::from(header.counts.queries)).ok()?;
        Some(Self {
            handle,
            queries,
            request_meta: request.metadata,
            edns,
            batch: Vec::new(),
            batch_len: 0,
            info: None,
        })
    }

    fn metadata(&self, rcode: ResponseCode) -> Metadata {
        let mut metadata = Metadata::response_from_request(&self.request_meta);
        metadata.authoritative = rcode == ResponseCode::NoError;
        metadata.response_code = rcode;
        metadata
    }

    /// Whether a message could not be sent (the client went away): the
    /// rest is not worth building.
    fn failed(&self) -> bool {
        matches!(self.info, Some(Err(())))
    }

    /// Adds `record` (at most `len` bytes when encoded; 0 to measure it),
    /// sending the batch first when it would not fit.
    async fn push(&mut self, record: Record, len: usize) {
        if self.failed() {
            return;
        }
        let len = if len == 0 {
            crate::index::encoded_len(&record)
        } else {
            len
        };
        if !self.batch.is_empty() && self.batch_len + len > MESSAGE_BUDGET {
            self.flush().await;
        }
        self.batch_len += len;
        self.batch.push(record);
    }

    /// Sends the batch, waiting while the connection's queue is full.
    async fn flush(&mut self) {
        let metadata = self.metadata(ResponseCode::NoError);
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_micros(200);
        let sent = loop {
            let response = MessageResponseBuilder::new(&self.queries, self.edns.as_ref()).build(
                metadata,
                self.batch.iter(),
                iter::empty(),
                iter::empty(),
                iter::empty(),
            );
            match self.handle.send_response(response).await {
                Ok(info) => break Ok(info),
                // The queue is full (the writer runs between our sends)
                // or the connection is gone; only time tells which.
                Err(error) if started.elapsed() >= STALL_LIMIT => {
                    tracing::info!(%error, "zone transfer abandoned: the client stopped reading");
                    break Err(());
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
        };
        self.batch.clear();
        self.batch_len = 0;
        self.info = Some(sent);
    }

    /// Sends what is left; the last message's info.
    async fn finish(mut self) -> ResponseInfo {
        if !self.batch.is_empty() {
            self.flush().await;
        }
        match self.info {
            Some(Ok(info)) => info,
            _ => ResponseInfo::from(Header {
                metadata: self.metadata(ResponseCode::ServFail),
                counts: HeaderCounts::default(),
            }),
        }
    }

    /// A message with only `rcode`.
    async fn error(mut self, rcode: ResponseCode) -> ResponseInfo {
        let metadata = self.metadata(rcode);
        let response = MessageResponseBuilder::new(&self.queries, self.edns.as_ref())
            .build_no_records(metadata);
        match self.handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, "zone transfer: cannot send");
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_compare_by_rfc_1982() {
        assert!(serial_newer(2, 1));
        assert!(!serial_newer(1, 2));
        assert!(!serial_newer(7, 7));
        // Across the wrap.
        assert!(serial_newer(3, u32::MAX - 2));
        assert!(!serial_newer(u32::MAX - 2, 3));
    }
}
