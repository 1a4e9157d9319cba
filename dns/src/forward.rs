//! Forwarding names outside the zone to upstream resolvers, so that a host
//! can put this server alone in its resolv.conf.
//!
//! The upstream's answer records and response code are relayed (NXDOMAIN
//! stays NXDOMAIN, with the upstream's SOA); anything else that goes wrong
//! (timeout, refusal, unreachable upstream) becomes SERVFAIL within the
//! forward timeout, so the client hears a failure instead of timing out.
//!
//! # One socket per upstream
//!
//! Each upstream has one UDP socket, connected to it, and one task reading
//! its replies; a query in flight is an entry in that upstream's table of
//! pending message ids (its question and a oneshot channel), as in
//! CoreDNS's `forward` plugin and dnsdist. A query waiting on a dead
//! upstream so costs its entry and the task that waits, a few hundred
//! bytes, where a resolver that opens a socket, a receive buffer and a
//! retry task per query and per retransmission (hickory-resolver's UDP
//! client) costs tens of KB, which a burst to a dead upstream multiplies.
//!
//! The trade-off is the source port: it is chosen once per upstream, not
//! per query, so a reply is told from a forgery by its message id (random),
//! its question (which must echo ours) and its source (the kernel delivers
//! only the upstream's datagrams to a connected socket). The upstreams are
//! the host's own resolvers; a client that needs per-query port
//! randomisation talks to them directly.
//!
//! A query goes to the first two upstreams at once (the first good answer
//! wins, as hickory-resolver's pool did) and, if both fail, to the next
//! two; over UDP it is sent again twice within the timeout, with the same
//! id, in case a datagram was lost. A truncated reply is asked again over
//! TCP, on a connection of its own (rare: forwarded answers are small).
//!
//! At most `--max-forwards` queries wait on upstreams at once, so a client
//! allowed to recurse cannot grow the process by asking for names a dead
//! upstream never answers. Past the bound the client gets SERVFAIL at once.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::AbortHandle;

use crate::error::DnsError;
use crate::metrics::ForwardResult;

/// The EDNS payload we advertise upstream, and so the largest UDP reply we
/// read: the size DNS Flag Day 2020 settled on.
const UPSTREAM_PAYLOAD: u16 = 1232;

/// Times a query is sent over UDP to one upstream within the timeout (the
/// first send and the retransmissions).
const UDP_SENDS: u32 = 3;

/// Random ids tried for a query before the upstream counts as overloaded:
/// only reached with tens of thousands of queries pending on it.
const ID_ATTEMPTS: usize = 16;

/// Upstreams asked at once for one query.
const PARALLEL: usize = 2;

/// What an upstream said.
#[derive(Debug)]
pub(crate) struct Forwarded {
    /// Response code to relay.
    pub(crate) rcode: ResponseCode,
    /// Answer records.
    pub(crate) answers: Vec<Record>,
    /// Authority records (the SOA of a negative answer).
    pub(crate) authorities: Vec<Record>,
    /// How it went, for the metrics.
    pub(crate) result: ForwardResult,
}

impl Forwarded {
    fn failed(result: ForwardResult) -> Self {
        Self {
            rcode: ResponseCode::ServFail,
            answers: Vec::new(),
            authorities: Vec::new(),
            result,
        }
    }
}

/// The configured upstreams, and the bound on queries waiting on them.
pub(crate) struct Forwarder {
    upstreams: Vec<Arc<Upstream>>,
    timeout: Duration,
    /// One permit per query that may wait upstream.
    in_flight: Arc<Semaphore>,
    /// The upstreams' receive tasks, stopped with the forwarder.
    receivers: Vec<AbortHandle>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field(
                "upstreams",
                &self.upstreams.iter().map(|u| u.addr).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .field("free", &self.in_flight.available_permits())
            .finish()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for receiver in &self.receivers {
            receiver.abort();
        }
    }
}

impl Forwarder {
    /// A forwarder to `upstreams`, with at most `max_in_flight` queries
    /// waiting at once. Call it inside a Tokio runtime: each upstream's
    /// socket is registered with it and its receive task spawned on it.
    pub(crate) fn new(
        upstreams: &[SocketAddr],
        timeout: Duration,
        max_in_flight: usize,
    ) -> Result<Self, DnsError> {
        let mut opened = Vec::with_capacity(upstreams.len());
        let mut receivers = Vec::with_capacity(upstreams.len());
        for &addr in upstreams {
            let upstream = Arc::new(
                Upstream::connect(addr).map_err(|source| DnsError::Upstream { addr, source })?,
            );
            receivers.push(tokio::spawn(receive(upstream.clone())).abort_handle());
            opened.push(upstream);
        }
        Ok(Self {
            upstreams: opened,
            timeout,
            in_flight: Arc::new(Semaphore::new(max_in_flight.min(Semaphore::MAX_PERMITS))),
            receivers,
        })
    }

    /// Resolves `query` upstream within the forward timeout, or fails at
    /// once when the bound of queries in flight is reached.
    pub(crate) async fn forward(&self, query: &Query) -> Forwarded {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Forwarded::failed(ForwardResult::Overloaded);
        };
        let mut name = query.name().clone();
        name.set_fqdn(true);
        let question = Query::query(name, query.query_type());
        match tokio::time::timeout(self.timeout, self.ask_all(&question)).await {
            Err(_) => Forwarded::failed(ForwardResult::Timeout),
            Ok(Err(result)) => Forwarded::failed(result),
            Ok(Ok(reply)) => relay(reply),
        }
    }

    /// The first usable reply of the upstreams, asked [`PARALLEL`] at a
    /// time in the configured order.
    async fn ask_all(&self, question: &Query) -> Result<Message, ForwardResult> {
        let mut last = ForwardResult::Failed;
        for group in self.upstreams.chunks(PARALLEL) {
            let mut asks: FuturesUnordered<_> = group
                .iter()
                .map(|upstream| upstream.ask(question, self.timeout))
                .collect();
            while let Some(result) = asks.next().await {
                match result {
                    Ok(reply) if usable(&reply) => return Ok(reply),
                    Ok(reply) => {
                        tracing::debug!(rcode = %reply.metadata.response_code, "upstream failed the query");
                        last = ForwardResult::Failed;
                    }
                    Err(result) => last = result,
                }
            }
        }
        Err(last)
    }
}

/// Whether `reply` is an answer to relay rather than the upstream's own
/// failure (SERVFAIL, REFUSED...), after which another upstream is asked.
fn usable(reply: &Message) -> bool {
    matches!(
        reply.metadata.response_code,
        ResponseCode::NoError | ResponseCode::NXDomain
    ) && reply
        .answers
        .iter()
        .chain(&reply.authorities)
        .all(|r| r.dns_class == DNSClass::IN)
}

/// What the client hears of an upstream's usable reply: the answer records
/// of a positive answer; the code and the SOA of a negative one (NXDOMAIN,
/// or NODATA).
fn relay(reply: Message) -> Forwarded {
    let rcode = reply.metadata.response_code;
    if rcode == ResponseCode::NoError && !reply.answers.is_empty() {
        return Forwarded {
            rcode,
            answers: reply.answers,
            authorities: Vec::new(),
            result: ForwardResult::Answered,
        };
    }
    Forwarded {
        rcode,
        answers: Vec::new(),
        authorities: reply
            .authorities
            .into_iter()
            .filter(|r| r.record_type() == RecordType::SOA)
            .take(1)
            .collect(),
        result: ForwardResult::Answered,
    }
}

/// A query waiting for its reply.
struct Waiter {
    /// Tells this query's entry from a later one that reuses its id.
    token: u64,
    /// What the reply must echo.
    question: Query,
    reply: oneshot::Sender<Reply>,
}

/// What the receive task hands a waiting query.
enum Reply {
    Message(Message),
    /// The upstream's host said nothing listens there (ICMP).
    Unreachable,
}

/// One upstream: its connected socket and the queries waiting on it.
struct Upstream {
    addr: SocketAddr,
    socket: UdpSocket,
    pending: Mutex<HashMap<u16, Waiter>>,
    next_token: AtomicU64,
}

impl Upstream {
    fn connect(addr: SocketAddr) -> io::Result<Self> {
        let any: IpAddr = match addr {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
        socket.connect(addr)?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            addr,
            socket: UdpSocket::from_std(socket)?,
            pending: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(0),
        })
    }

    /// The pending table; a panic elsewhere while it was held left it
    /// consistent (every change is one insert or remove).
    fn pending(&self) -> MutexGuard<'_, HashMap<u16, Waiter>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks this upstream `question` over UDP (and TCP if the reply is
    /// truncated), for at most `timeout`.
    async fn ask(&self, question: &Query, timeout: Duration) -> Result<Message, ForwardResult> {
        let (entry, mut reply) = self.register(question)?;
        let bytes = encode(entry.id, question).ok_or(ForwardResult::Failed)?;
        let resend = timeout / UDP_SENDS;
        let mut sends = 0;
        let message = loop {
            if sends < UDP_SENDS {
                sends += 1;
                if let Err(error) = self.socket.send(&bytes).await {
                    tracing::debug!(%error, upstream = %self.addr, "cannot send a forwarded query");
                    return Err(ForwardResult::Failed);
                }
            }
            let wait = if sends < UDP_SENDS { resend } else { timeout };
            match tokio::time::timeout(wait, &mut reply).await {
                Err(_) => continue,
                Ok(Ok(Reply::Message(message))) => break message,
                Ok(Ok(Reply::Unreachable) | Err(_)) => return Err(ForwardResult::Failed),
            }
        };
        drop(entry);
        if message.metadata.truncation {
            return self.ask_tcp(question).await;
        }
        Ok(message)
    }

    /// Enters `question` in the pending table under a random free id.
    fn register(
        &self,
        question: &Query,
    ) -> Result<(Entry<'_>, oneshot::Receiver<Reply>), ForwardResult> {
        let (tx, rx) = oneshot::channel();
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let mut pending = self.pending();
        for _ in 0..ID_ATTEMPTS {
            let id: u16 = rand::random();
            if let std::collections::hash_map::Entry::Vacant(slot) = pending.entry(id) {
                slot.insert(Waiter {
                    token,
                    question: question.clone(),
                    reply: tx,
                });
                let entry = Entry {
                    upstream: self,
                    id,
                    token,
                };
                return Ok((entry, rx));
            }
        }
        Err(ForwardResult::Overloaded)
    }

    /// Hands `datagram` to the query it answers, if any.
    fn deliver(&self, datagram: &[u8]) {
        let Ok(message) = Message::from_vec(datagram) else {
            tracing::debug!(upstream = %self.addr, "undecodable reply from upstream");
            return;
        };
        if message.metadata.message_type != MessageType::Response {
            return;
        }
        let mut pending = self.pending();
        let id = message.metadata.id;
        // The question must be ours (RFC 5452 §9.1): the id alone is 16 bits.
        let ours = pending
            .get(&id)
            .is_some_and(|w| matches!(message.queries.as_slice(), [q] if *q == w.question));
        if !ours {
            tracing::debug!(upstream = %self.addr, id, "reply matches no query in flight");
            return;
        }
        if let Some(waiter) = pending.remove(&id) {
            drop(pending);
            // The query may have given up since: nothing to do then.
            let _ = waiter.reply.send(Reply::Message(message));
        }
    }

    /// Fails every query in flight: the upstream's host says nothing
    /// listens on its port.
    fn unreachable(&self) {
        let waiters: Vec<Waiter> = self.pending().drain().map(|(_, w)| w).collect();
        for waiter in waiters {
            let _ = waiter.reply.send(Reply::Unreachable);
        }
    }

    /// Asks `question` over a TCP connection of its own (RFC 7766), after a
    /// truncated UDP reply; the caller's timeout bounds it.
    async fn ask_tcp(&self, question: &Query) -> Result<Message, ForwardResult> {
        let failed = |error: io::Error| {
            tracing::debug!(%error, upstream = %self.addr, "forwarding over TCP failed");
            ForwardResult::Failed
        };
        let id: u16 = rand::random();
        let bytes = encode(id, question).ok_or(ForwardResult::Failed)?;
        let len = u16::try_from(bytes.len()).map_err(|_| ForwardResult::Failed)?;
        let mut stream = TcpStream::connect(self.addr).await.map_err(failed)?;
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&bytes);
        stream.write_all(&framed).await.map_err(failed)?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.map_err(failed)?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await.map_err(failed)?;
        match Message::from_vec(&reply) {
            Ok(message)
                if message.metadata.id == id
                    && message.metadata.message_type == MessageType::Response
                    && matches!(message.queries.as_slice(), [q] if q == question) =>
            {
                Ok(message)
            }
            _ => Err(ForwardResult::Failed),
        }
    }
}

/// A query's place in the pending table, removed when the query is done or
/// gives up (its future dropped by the timeout).
struct Entry<'a> {
    upstream: &'a Upstream,
    id: u16,
    token: u64,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let mut pending = self.upstream.pending();
        // The receive task may have removed ours and a later query taken
        // the id since.
        if pending.get(&self.id).is_some_and(|w| w.token == self.token) {
            pending.remove(&self.id);
        }
    }
}

/// The wire form of a recursive query for `question` with id `id`.
fn encode(id: u16, question: &Query) -> Option<Vec<u8>> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(question.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(UPSTREAM_PAYLOAD);
    message.set_edns(edns);
    message.to_vec().ok()
}

/// Reads `upstream`'s replies and hands each to its query, until aborted.
async fn receive(upstream: Arc<Upstream>) {
    let mut buf = vec![0u8; usize::from(UPSTREAM_PAYLOAD)];
    loop {
        match upstream.socket.recv(&mut buf).await {
            Ok(n) => upstream.deliver(&buf[..n]),
            // An ICMP port unreachable for an earlier query, reported on
            // the connected socket.
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::debug!(upstream = %upstream.addr, "upstream unreachable");
                upstream.unreachable();
            }
            Err(error) => {
                tracing::debug!(%error, upstream = %upstream.addr, "cannot read from upstream");
                // Do not spin on a persistent error.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData};

    /// A fake upstream on loopback that answers each query with `answer`
    /// applied to it.
    async fn fake_upstream(
        answer: impl Fn(Message) -> Option<Message> + Send + 'static,
    ) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let query = Message::from_vec(&buf[..n]).unwrap();
                if let Some(reply) = answer(query) {
                    socket
                        .send_to(&reply.to_vec().unwrap(), from)
                        .await
                        .unwrap();
                }
            }
        });
        addr
    }

    fn question(name: &str) -> Query {
        Query::query(Name::from_ascii(name).unwrap(), RecordType::A)
    }

    fn a_reply(query: &Message, ip: [u8; 4]) -> Message {
        let mut reply = Message::response(query.metadata.id, OpCode::Query);
        reply.add_query(query.queries[0].clone());
        reply.add_answer(Record::from_rdata(
            query.queries[0].name().clone(),
            60,
            RData::A(A::from(Ipv4Addr::from(ip))),
        ));
        reply
    }

    #[tokio::test]
    async fn replies_reach_their_own_query() {
        // Answers a1 with .1 and a2 with .2.
        let up = fake_upstream(|q| {
            let last = if q.queries[0].name().to_ascii().starts_with("a1") {
                1
            } else {
                2
            };
            Some(a_reply(&q, [192, 0, 2, last]))
        });
        let forwarder = Forwarder::new(&[up.await], Duration::from_secs(2), 10).unwrap();
        let (a1, a2) = (question("a1.example."), question("a2.example."));
        let (one, two) = tokio::join!(forwarder.forward(&a1), forwarder.forward(&a2));
        for (f, last) in [(one, 1), (two, 2)] {
            assert_eq!(f.rcode, ResponseCode::NoError);
            assert_eq!(
                f.answers[0].data,
                RData::A(A::from(Ipv4Addr::new(192, 0, 2, last)))
            );
        }
        assert!(
            forwarder.upstreams[0].pending().is_empty(),
            "nothing left pending"
        );
    }

    #[tokio::test]
    async fn a_reply_to_another_question_is_ignored() {
        // Echoes the id with another question: a forgery, never accepted.
        let up = fake_upstream(|q| {
            let mut other = q.clone();
            other.queries[0] = question("evil.example.");
            Some(a_reply(&other, [203, 0, 113, 1]))
        });
        let forwarder = Forwarder::new(&[up.await], Duration::from_millis(300), 10).unwrap();
        let f = forwarder.forward(&question("good.example.")).await;
        assert_eq!(f.rcode, ResponseCode::ServFail);
        assert_eq!(f.result, ForwardResult::Timeout);
        assert!(
            forwarder.upstreams[0].pending().is_empty(),
            "the timeout cleared it"
        );
    }

    #[tokio::test]
    async fn a_failing_upstream_hands_over_to_the_next() {
        let refusing = fake_upstream(|q| {
            let mut reply = Message::response(q.metadata.id, OpCode::Query);
            reply.add_query(q.queries[0].clone());
            reply.metadata.response_code = ResponseCode::Refused;
            Some(reply)
        })
        .await;
        let good = fake_upstream(|q| Some(a_reply(&q, [192, 0, 2, 7]))).await;
        // The first two are asked together and both refuse; the third is
        // asked next.
        let forwarder =
            Forwarder::new(&[refusing, refusing, good], Duration::from_secs(2), 10).unwrap();
        let f = forwarder.forward(&question("x.example.")).await;
        assert_eq!(f.rcode, ResponseCode::NoError);
        assert_eq!(
            f.answers[0].data,
            RData::A(A::from(Ipv4Addr::new(192, 0, 2, 7)))
        );
        // The only ones: no upstream to hand over to.
        let forwarder = Forwarder::new(&[refusing], Duration::from_secs(2), 10).unwrap();
        let f = forwarder.forward(&question("x.example.")).await;
        assert_eq!(f.rcode, ResponseCode::ServFail);
        assert_eq!(f.result, ForwardResult::Failed);
    }

    #[tokio::test]
    async fn a_closed_port_fails_at_once() {
        // Nothing listens: the kernel's port unreachable ends the wait.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let forwarder = Forwarder::new(&[closed], Duration::from_secs(2), 10).unwrap();
        let started = tokio::time::Instant::now();
        let f = forwarder.forward(&question("x.example.")).await;
        assert_eq!(f.result, ForwardResult::Failed);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_truncated_reply_is_asked_again_over_tcp() {
        // UDP says TC; TCP on the same port has the answer.
        let udp = fake_upstream(|q| {
            let mut reply = Message::response(q.metadata.id, OpCode::Query);
            reply.add_query(q.queries[0].clone());
            reply.metadata.truncation = true;
            Some(reply)
        })
        .await;
        let tcp = tokio::net::TcpListener::bind(udp).await.unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = tcp.accept().await.unwrap();
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.unwrap();
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut query).await.unwrap();
            let reply = a_reply(&Message::from_vec(&query).unwrap(), [192, 0, 2, 9]);
            let bytes = reply.to_vec().unwrap();
            let len = u16::try_from(bytes.len()).unwrap().to_be_bytes();
            stream.write_all(&len).await.unwrap();
            stream.write_all(&bytes).await.unwrap();
        });
        let forwarder = Forwarder::new(&[udp], Duration::from_secs(2), 10).unwrap();
        let f = forwarder.forward(&question("big.example.")).await;
        assert_eq!(f.rcode, ResponseCode::NoError);
        assert_eq!(
            f.answers[0].data,
            RData::A(A::from(Ipv4Addr::new(192, 0, 2, 9)))
        );
    }
}
