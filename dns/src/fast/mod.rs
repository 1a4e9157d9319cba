//! The UDP fast path: one receive/answer loop per socket, on a thread of
//! its own.
//!
//! A thread blocks in `recv_from`, reads the common query in place
//! ([`query`]), writes the response from the index's pre-encoded records
//! ([`respond`]) and sends it from the same thread: per query there is no
//! task, no allocation and no wake-up of another thread. hickory-server's
//! UDP loop decodes every datagram into a message and spawns a task for
//! it, which a runtime thread must then be woken to run; when the answer
//! itself is a hash lookup and a few copies, that machinery is most of the
//! cost (the README's DNS benchmark has the figures).
//!
//! The price is that the answer rules are written twice: here, over bytes,
//! and in [`crate::handler`] and [`crate::response`], over hickory's types.
//! The tests in `tests.rs` send the same queries (every row of the answer
//! table, then random and mutated packets) down both paths and require the
//! same header, question, record sets and OPT back; a rule changed in one
//! place only fails them.
//!
//! Whatever is not the common case (forwarding, other opcodes, ANY, EDNS
//! versions above 0, malformed packets...) is handed as bytes to the hickory
//! handler on the Tokio runtime, which answers on the same socket, so a
//! client cannot tell which path answered. TCP stays on hickory-server.

mod query;
mod respond;

#[cfg(test)]
mod tests;

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Header, MessageType, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rustix::io::Errno;
use rustix::net::addr::SocketAddrArg;
use rustix::net::{
    MMsgHdr, RecvFlags, SendAncillaryBuffer, SendFlags, SocketAddrAny, recvfrom, sendmmsg,
};
use std::io::IoSlice;

use crate::handler::{Handler, Shared};
use crate::metrics::QueryStats;
use crate::name::NameKey;

pub(crate) use query::{Parsed, parse};
pub(crate) use respond::{Context, Scratch, respond};

/// How often a receive loop idle in `recv_from` looks at the stop flag:
/// bounds how long shutting down takes.
const STOP_POLL: Duration = Duration::from_millis(100);

/// The largest datagram: a query is read whole or not at all.
const MAX_DATAGRAM: usize = 65_535;

/// Most datagrams answered per `sendmmsg`: enough to amortise the system
/// call, few enough that the first answer of a burst is not held long.
const BATCH: usize = 32;

/// A receive loop's own state.
struct LoopState {
    stats: Arc<QueryStats>,
    rng: SmallRng,
    scratch: Scratch,
    /// The last client's address and whether it may recurse: a busy
    /// client sends many queries in a row.
    last_client: Option<(IpAddr, bool)>,
    origin_labels: usize,
    zone_key: NameKey,
    /// A response buffer per batch slot; the first `dsts.len()` are ready.
    outs: Vec<Vec<u8>>,
    /// Where each ready response goes.
    dsts: Vec<SocketAddrAny>,
}

/// One socket's receive/answer loop.
pub(crate) struct UdpLoop {
    /// The server's state.
    pub(crate) shared: Arc<Shared>,
    /// The socket (shared with the fallback tasks, which answer on it).
    pub(crate) socket: Arc<UdpSocket>,
    /// Where fallbacks run.
    pub(crate) runtime: tokio::runtime::Handle,
    /// Set when the server stops.
    pub(crate) stop: Arc<AtomicBool>,
}

impl UdpLoop {
    /// Makes `socket` blocking with a receive timeout, for [`Self::run`].
    pub(crate) fn prepare(socket: &UdpSocket) -> io::Result<()> {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(STOP_POLL))
    }

    /// Answers datagrams until the stop flag is set.
    ///
    /// The thread blocks for one datagram, then takes whatever else is
    /// already queued (up to [`BATCH`]) without blocking, answers them all
    /// and sends the answers with one `sendmmsg`: under load, a system call
    /// per datagram is saved, and the thread sleeps and wakes once per
    /// burst rather than once per query.
    pub(crate) fn run(self) {
        let mut state = LoopState {
            stats: self.shared.metrics.thread_stats(),
            rng: SmallRng::from_rng(&mut rand::rng()),
            scratch: Scratch::default(),
            last_client: None,
            origin_labels: usize::from(self.shared.zone.origin.num_labels()),
            zone_key: crate::name::key_of(&self.shared.zone.origin),
            outs: (0..BATCH).map(|_| Vec::with_capacity(512)).collect(),
            dsts: Vec::with_capacity(BATCH),
        };
        let mut buf = vec![0u8; MAX_DATAGRAM];

        while !self.stop.load(Ordering::Relaxed) {
            match self.socket.recv_from(&mut buf) {
                Ok((n, src)) => self.handle(&mut state, &buf[..n], src),
                Err(e) if is_transient(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "UDP receive failed");
                    // Do not spin on a persistent error.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            while state.dsts.len() < BATCH {
                match recvfrom(&*self.socket, &mut buf[..], RecvFlags::DONTWAIT) {
                    Ok((n, _, Some(addr))) => match SocketAddr::try_from(addr) {
                        Ok(src) => self.handle(&mut state, &buf[..n.min(buf.len())], src),
                        Err(_) => continue,
                    },
                    Ok((_, _, None)) => continue,
                    Err(Errno::INTR) => continue,
                    // Nothing more queued (or an error the next blocking
                    // receive will report).
                    Err(_) => break,
                }
            }
            self.flush(&mut state);
        }
    }

    /// Answers one datagram: into the batch, or through hickory.
    fn handle(&self, st: &mut LoopState, packet: &[u8], src: SocketAddr) {
        if !can_answer(src) {
            return;
        }
        // Refusals are rare and not worth a fast path of their own.
        if !self.shared.may_query(src.ip()) {
            return self.fallback(packet, src);
        }
        let start = Instant::now();
        let q = match parse(packet, &st.zone_key, st.origin_labels) {
            Parsed::Fast(q) => q,
            Parsed::Drop => return,
            Parsed::Hickory => return self.fallback(packet, src),
        };
        let recursion = match st.last_client {
            Some((ip, may)) if ip == src.ip() => may,
            _ => {
                let may = self.shared.may_recurse(src.ip());
                st.last_client = Some((src.ip(), may));
                may
            }
        };
        let cx = Context {
            max_udp_payload: self.shared.max_udp_payload,
            recursion,
            answer_limit: self.shared.udp_answer_limit,
        };
        let slot = st.dsts.len();
        let index = self.shared.index.load();
        if !index.loaded {
            // Before the first sync the hickory path answers (SERVFAIL).
            drop(index);
            return self.fallback(packet, src);
        }
        let out = &mut st.outs[slot];
        let answered = respond(packet, &q, &index, cx, &mut st.rng, &mut st.scratch, out);
        drop(index);
        match answered {
            Some(rcode) => {
                st.dsts.push(src.as_any());
                st.stats
                    .query(Some(u16::from(q.qtype)), u16::from(rcode), start.elapsed());
            }
            None => self.fallback(packet, src),
        }
    }

    /// Sends the batch's answers.
    fn flush(&self, st: &mut LoopState) {
        let n = st.dsts.len();
        if n == 0 {
            return;
        }
        let iovs: Vec<[IoSlice<'_>; 1]> = st.outs[..n].iter().map(|o| [IoSlice::new(o)]).collect();
        let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
            (0..n).map(|_| SendAncillaryBuffer::default()).collect();
        let mut msgs: Vec<MMsgHdr<'_>> = st
            .dsts
            .iter()
            .zip(&iovs)
            .zip(controls.iter_mut())
            .map(|((dst, iov), control)| MMsgHdr::new_with_addr(dst, iov, control))
            .collect();
        let mut sent = 0;
        while sent < n {
            match sendmmsg(&*self.socket, &mut msgs[sent..], SendFlags::empty()) {
                Ok(0) => break,
                Ok(k) => sent += k,
                Err(Errno::INTR) => {}
                Err(e) => {
                    // The first message of the rest failed (an unreachable
                    // client, say): skip it, send the others.
                    tracing::debug!(error = %e, "cannot send response");
                    sent += 1;
                }
            }
        }
        drop(msgs);
        st.dsts.clear();
    }

    /// Hands `packet` to the hickory handler on the runtime.
    fn fallback(&self, packet: &[u8], src: SocketAddr) {
        let handler = Handler(self.shared.clone());
        let socket = self.socket.clone();
        let bytes = packet.to_vec();
        self.runtime
            .spawn(async move { hickory_answer(handler, socket, bytes, src).await });
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Whether a response to `src` may be sent: never to port 0 or to an
/// unspecified or broadcast address (hickory-server's rule, which stops the
/// server being used to reflect traffic at such addresses).
fn can_answer(src: SocketAddr) -> bool {
    src.port() != 0
        && match src.ip() {
            IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_broadcast(),
            IpAddr::V6(v6) => !v6.is_unspecified(),
        }
}

/// Answers `bytes` the way hickory-server's UDP loop does: nothing for a
/// packet shorter than a header or for a response, FORMERR for one that does
/// not decode, the handler's answer otherwise.
pub(crate) async fn hickory_answer(
    handler: Handler,
    socket: Arc<UdpSocket>,
    bytes: Vec<u8>,
    src: SocketAddr,
) {
    let Ok(header) = Header::read(&mut BinDecoder::new(&bytes)) else {
        return;
    };
    let reply = UdpReply { socket, dst: src };
    match Request::from_bytes(bytes, src, Protocol::Udp) {
        Ok(request) if request.metadata.message_type == MessageType::Response => {}
        Ok(request) => {
            handler
                .handle_request::<_, TokioTime>(&request, reply)
                .await;
        }
        Err(error) => {
            tracing::debug!(%error, client = %src, "undecodable query");
            // No question is echoed: it did not decode.
            let Ok(queries) = Queries::read(&mut BinDecoder::new(&[]), 0) else {
                return;
            };
            // `qr rd` and the code, as Knot answers: CD is not echoed.
            let mut request_meta = header.metadata;
            request_meta.checking_disabled = false;
            let response = MessageResponseBuilder::new(&queries, None)
                .error_msg(&request_meta, ResponseCode::FormErr);
            let mut reply = reply;
            if let Err(error) = reply.send_response(response).await {
                tracing::debug!(%error, "cannot send FORMERR");
            }
        }
    }
}

/// Sends hickory's responses on a fast-path socket.
#[derive(Clone)]
pub(crate) struct UdpReply {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpReply {
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
        // hickory's UDP limit: the response's OPT size, 512 without one (the
        // handler has already cut the answer to the client's size).
        let max = response.edns().map_or(512, |e| e.max_payload());
        let mut buf = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(max);
        let info = response.destructive_emit(&mut encoder)?;
        // A UDP send only blocks when the socket's send buffer is full; the
        // fast path never holds it long.
        self.socket.send_to(&buf, self.dst)?;
        Ok(info)
    }
}
